"""Shared by the quant tests that check errors raised by the executor build."""

from __future__ import annotations

import os

from inferops import build_info


def cxx_exceptions_abort() -> bool:
    """True under the AddressSanitizer build of the executor with only libasan preloaded:
    ASan's __cxa_throw interceptor, set up before libstdc++ is loaded, then finds no real
    __cxa_throw and aborts the process on the first C++ exception thrown from _simt
    ("CHECK failed: asan_interceptors.cpp ... real___cxa_throw"). CI preloads libstdc++ too
    (LD_PRELOAD="libasan.so libstdc++.so"), which lets such exceptions through; the plain
    executor run always checks them."""
    san = build_info().get("simt", {}).get("sanitizer") or ""
    return "address" in san and "libstdc++" not in os.environ.get("LD_PRELOAD", "")
