"""``inferops-bench``: finds and runs the C++ microbenchmark binaries (docs/bench.md).

    inferops-bench <family> <op>|all [flags]     e.g. inferops-bench attention paged_decode --B=64
    inferops-bench --list                        the binaries found, and where

Families: attention, linear_attention, quant, moe, tp. The binaries are installed into
``inferops/bin/`` only by a build with ``INFEROPS_BUILD_BENCH=1`` (``INFEROPS_BUILD_BENCH=1 pip
install .``); ``INFEROPS_BENCH_BIN_DIR`` points at another directory (a CMake build dir, where
the executor builds are named ``bench_<family>_simt``; those are used when no GPU build is
there). Every flag after the family goes to the binary: ``inferops-bench quant --help``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

FAMILIES = ("attention", "linear_attention", "quant", "moe", "tp")


def search_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("INFEROPS_BENCH_BIN_DIR"):
        dirs.append(Path(os.environ["INFEROPS_BENCH_BIN_DIR"]))
    dirs.append(Path(__file__).resolve().parent / "bin")
    return dirs


def find_binary(family: str) -> Path | None:
    """The GPU build of ``bench_<family>`` if one is found, else its executor build."""
    for name in (f"bench_{family}", f"bench_{family}_simt"):
        for d in search_dirs():
            p = d / name
            if p.is_file() and os.access(p, os.X_OK):
                return p
    return None


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if args else 2
    if args[0] == "--list":
        for fam in FAMILIES:
            p = find_binary(fam)
            print(f"{fam:18s} {p if p else 'not built'}")
        return 0
    family = args[0]
    if family not in FAMILIES:
        print(f"inferops-bench: expected a family in {', '.join(FAMILIES)}, got {family!r}", file=sys.stderr)
        return 2
    exe = find_binary(family)
    if exe is None:
        where = ", ".join(str(d) for d in search_dirs())
        print(f"inferops-bench: bench_{family} not found in {where}: build the package with "
              "INFEROPS_BUILD_BENCH=1 (see docs/bench.md) or set INFEROPS_BENCH_BIN_DIR", file=sys.stderr)
        return 2
    sys.stdout.flush()
    os.execv(str(exe), [str(exe), *args[1:]])
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
