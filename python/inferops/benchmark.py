"""Benchmark helpers shared by every family's benchmark and by ``python -m inferops check``.

* :func:`time_fn`: warm-up, then per-iteration timing (CUDA events on a GPU,
  ``perf_counter`` on the CPU), median and spread. Pass several input sets
  whose total size exceeds the L2 cache and ``time_fn`` rotates through them,
  so a memory-bound kernel is timed against HBM, not L2.
* :func:`measure_ceilings`: the two numbers every result is judged against on
  this GPU, measured in the same run: device-to-device copy bandwidth
  (bytes read + written) and a BF16 GEMM rate through torch (cuBLAS).
* :class:`Results`: one JSON line per measurement appended to a file, and a
  markdown table rendered from those lines.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

__all__ = [
    "Timing",
    "time_fn",
    "inputs_to_exceed_l2",
    "Ceilings",
    "measure_ceilings",
    "device_name",
    "Results",
    "render_markdown",
]


@dataclass(frozen=True)
class Timing:
    """Per-call times in microseconds over ``iters`` timed calls."""

    median_us: float
    p10_us: float
    p90_us: float
    iters: int
    method: str  # "cuda_graph", "cuda_events" or "perf_counter"

    def __str__(self) -> str:
        return (f"{self.median_us:.2f} us (p10 {self.p10_us:.2f}, p90 {self.p90_us:.2f}, "
                f"n={self.iters}, {self.method})")


def _percentile(sorted_vals: Sequence[float], q: float) -> float:
    i = min(len(sorted_vals) - 1, max(0, int(round(q * (len(sorted_vals) - 1)))))
    return sorted_vals[i]


def time_fn(
    fn: Callable[..., Any],
    input_sets: Sequence[tuple] | None = None,
    *,
    device: torch.device | str | None = None,
    warmup: int = 10,
    iters: int = 100,
    max_seconds: float = 2.0,
    cuda_graph: bool = True,
) -> Timing:
    """Median per-call time of ``fn(*input_sets[i % len(input_sets)])``.

    GPU, ``cuda_graph=True`` (default): the calls, rotating through every input
    set, are captured into one CUDA graph and the graph is replayed between
    CUDA events; time per call = replay time / calls per replay. This is the
    device time of the op with launch gaps removed; it fails over to plain
    events if ``fn`` cannot be captured. ``cuda_graph=False``: CUDA events
    around each eager call, which includes the Python/launch overhead whenever
    it exceeds the kernel time (what an eager caller sees).
    CPU: ``perf_counter`` around each call.
    ``max_seconds`` caps the timed loop (at least 5 samples) for slow baselines.
    """
    input_sets = list(input_sets) if input_sets else [()]
    if device is None:
        device = next(
            (t.device for s in input_sets for t in s if isinstance(t, torch.Tensor)),
            torch.device("cpu"),
        )
    device = torch.device(device)
    n_sets = len(input_sets)
    for i in range(max(warmup, n_sets)):
        fn(*input_sets[i % n_sets])
    times: list[float] = []
    method = "perf_counter"
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn(*input_sets[0])
        torch.cuda.synchronize(device)
        est = max(time.perf_counter() - t0, 1e-6)
        n = max(5, min(iters, int(max_seconds / est)))
        times, method = ([], "")
        if cuda_graph:
            times = _time_graph(fn, input_sets, device, n)
            method = "cuda_graph" if times else ""
        if not times:
            method = "cuda_events"
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
            for i in range(n):
                starts[i].record()
                fn(*input_sets[i % n_sets])
                ends[i].record()
            torch.cuda.synchronize(device)
            times = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]
    else:
        deadline = time.perf_counter() + max_seconds
        for i in range(iters):
            t0 = time.perf_counter()
            fn(*input_sets[i % n_sets])
            times.append((time.perf_counter() - t0) * 1e6)
            if len(times) >= 5 and time.perf_counter() > deadline:
                break
    times.sort()
    return Timing(statistics.median(times), _percentile(times, 0.1), _percentile(times, 0.9),
                  len(times), method)


def _time_graph(fn, input_sets, device, replays: int) -> list[float]:
    n_sets = len(input_sets)
    calls = n_sets * max(1, math.ceil(8 / n_sets))  # >= 8 calls per replay
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.stream(stream):
            for i in range(n_sets):  # warm up on the capture stream
                fn(*input_sets[i])
        torch.cuda.current_stream(device).wait_stream(stream)
        torch.cuda.synchronize(device)
        with torch.cuda.graph(graph, stream=stream):
            for i in range(calls):
                fn(*input_sets[i % n_sets])
    except Exception:  # not capturable (host sync, CPU tensors...): caller falls back
        torch.cuda.synchronize(device)
        return []
    graph.replay()
    torch.cuda.synchronize(device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    for i in range(replays):
        starts[i].record()
        graph.replay()
        ends[i].record()
    torch.cuda.synchronize(device)
    times = [s.elapsed_time(e) * 1e3 / calls for s, e in zip(starts, ends)]
    del graph
    return times


def inputs_to_exceed_l2(bytes_per_set: int, device: torch.device | str, factor: float = 2.0) -> int:
    """How many distinct input sets to rotate so their total exceeds ``factor`` x L2."""
    device = torch.device(device)
    if device.type != "cuda" or bytes_per_set <= 0:
        return 1
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return max(1, min(64, math.ceil(factor * l2 / bytes_per_set)))


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


@dataclass(frozen=True)
class Ceilings:
    """Measured on this device in this run."""

    device: str
    copy_gbps: float  # device-to-device copy, (read + write) bytes / s / 1e9
    bf16_tflops: float  # dense BF16 GEMM through torch.matmul (cuBLAS)
    copy_bytes: int
    gemm_size: int


def measure_ceilings(device: torch.device | str = "cuda", *, copy_mib: int = 1024,
                     gemm_size: int = 8192) -> Ceilings:
    """Copy bandwidth and BF16 GEMM rate on ``device``, on random data."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"measure_ceilings needs a CUDA device, got {device}")
    n = copy_mib * (1 << 20) // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    t_copy = time_fn(lambda: dst.copy_(src), device=device, warmup=3, iters=20)
    copy_gbps = 2 * n * 4 / (t_copy.median_us * 1e-6) / 1e9
    del src, dst
    a = torch.randn(gemm_size, gemm_size, device=device, dtype=torch.bfloat16)
    b = torch.randn(gemm_size, gemm_size, device=device, dtype=torch.bfloat16)
    t_mm = time_fn(lambda: torch.matmul(a, b), device=device, warmup=3, iters=20)
    tflops = 2 * gemm_size**3 / (t_mm.median_us * 1e-6) / 1e12
    return Ceilings(device_name(device), copy_gbps, tflops, 2 * n * 4, gemm_size)


@dataclass
class Results:
    """Appends one JSON object per measurement to ``path`` (JSON lines).

    Every record gets the device name and a UTC timestamp; benchmarks add
    ``family``, ``op``, ``sizes``, ``dtype``, ``time_us``, ``gbps`` or
    ``tflops``, ``pct_of_ceiling``, ``baseline``, ``baseline_time_us`` and
    ``speedup_vs_baseline`` (baseline time / our time).
    """

    path: str
    device: str
    common: dict = field(default_factory=dict)

    def add(self, **record: Any) -> dict:
        rec = {"device": self.device, "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        rec.update(self.common)
        rec.update(record)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
        return rec


_COLUMNS = [
    ("family", "family"), ("op", "op"), ("sizes", "sizes"), ("dtype", "dtype"),
    ("time_us", "time (us)"), ("gbps", "GB/s"), ("tflops", "TFLOP/s"),
    ("pct_of_ceiling", "% of ceiling"), ("baseline", "baseline"),
    ("baseline_time_us", "baseline (us)"), ("speedup_vs_baseline", "speedup"),
    ("reduction", "reduction vs baseline"),
    ("target", "target"), ("met", "met"),
]


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    if isinstance(v, dict):
        return " ".join(f"{k}={x}" for k, x in v.items())
    return str(v)


def render_markdown(records: Sequence[dict]) -> str:
    """Markdown table of benchmark records, one row each, grouped by device."""
    out = []
    rows = [r for r in records if r.get("op")]
    for dev in sorted({r["device"] for r in rows}):
        out.append(f"### {dev}\n")
        ceil = [r for r in records if r.get("kind") == "ceilings" and r["device"] == dev]
        if ceil:
            c = ceil[-1]
            out.append(f"Ceilings measured in the same run: copy {c['copy_gbps']:.0f} GB/s "
                       f"(read + write), BF16 GEMM {c['bf16_tflops']:.0f} TFLOP/s.\n")
        cols = [(k, h) for k, h in _COLUMNS if any(r.get(k) is not None for r in rows)]
        out.append("| " + " | ".join(h for _, h in cols) + " |")
        out.append("|" + "---|" * len(cols))
        for r in rows:
            if r["device"] == dev:
                out.append("| " + " | ".join(_fmt(r.get(k)) for k, _ in cols) + " |")
        out.append("")
    return "\n".join(out)


def load_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def ceilings_record(c: Ceilings) -> dict:
    d = asdict(c)
    d["kind"] = "ceilings"
    return d
