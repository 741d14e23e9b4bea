"""``python -m inferops simt-report``: memory-efficiency metrics of every kernel, from the CPU
SIMT executor (docs/developer.md, "Memory-access metrics").

Runs each case of :mod:`inferops.simt_report_cases` (every op at its family's headline shape,
scaled down where the executor is too slow but with the real per-block work) with the
executor's access instrumentation on, and reports per op:

* global bytes moved (32-byte sectors requested, no cache reuse) against the op's *ideal*
  (every byte it must read, read once; every byte it writes, written once), reads and writes
  apart, and the distinct bytes touched (what a perfect cache would fetch from DRAM);
* coalescing: sectors requested against the minimum for the bytes each warp-level request
  asked for;
* shared-memory bank conflicts: wavefronts against the minimum, for plain loads/stores and for
  the tensor-core operand paths (ldmatrix, wgmma core matrices);
* barriers and warp collectives per launch.

These are executor metrics, exact for the access pattern g++ compiled, not times and not a
model of caches or DRAM (docs/developer.md lists what is not modelled). Targets (issue 21):
memory-bound ops move at most 1.10x their ideal global bytes with coalesced requests (within
1.10x of the minimum sectors); tensor-core main loops have no bank conflicts on their operand
paths (ldmatrix / wgmma wavefronts at the minimum).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

__all__ = ["Result", "measure", "run_report", "main", "BYTES_TARGET", "SECTORS_TARGET"]

BYTES_TARGET = 1.10    # memory-bound ops: global bytes read / ideal read, and read + written / ideal
SECTORS_TARGET = 1.10  # memory-bound ops: sectors requested / minimum (coalescing)
# Known misses, each explained in docs/developer.md ("Memory-access metrics: what misses");
# op -> the check it misses. A miss not listed here fails the report.
KNOWN_MISSES: dict[str, set[str]] = {}


def _sum(records: list[dict], kind: str, key: str) -> int:
    return sum(int(r[kind][key]) for r in records)


def _ratio(a: float, b: float) -> float | None:
    return None if b == 0 else a / b


@dataclass
class Result:
    op: str
    label: str
    headline: str
    memory_bound: bool
    ideal_doc: str
    seconds: float
    kernels: list[str]
    launches: int
    ideal_read: int
    ideal_write: int
    read_bytes: int           # global sectors loaded (and atomics) x 32
    write_bytes: int          # global sectors stored (and atomics) x 32
    unique_read_bytes: int    # distinct sectors loaded x 32, summed over launches
    unique_write_bytes: int
    read_ratio: float | None
    write_ratio: float | None
    bytes_ratio: float | None  # (read + write) / (ideal read + ideal write)
    load_sectors_ratio: float | None   # sectors / minimum, loads
    store_sectors_ratio: float | None  # stores
    shared_ratio: float | None   # wavefronts / minimum, shared loads + stores
    ldmatrix_ratio: float | None
    wgmma_ratio: float | None
    barriers_per_launch: float
    collectives: dict
    worst_sites: list[dict] = field(default_factory=list)
    misses: list[str] = field(default_factory=list)
    known_misses: list[str] = field(default_factory=list)


def measure(case, gen: torch.Generator) -> Result:
    """Runs one case with the metrics on; returns its summary (raises on a kernel error)."""
    from inferops.testing import backend, simt_metrics

    inputs = case.make(gen)
    t0 = time.perf_counter()
    with backend("simt"), simt_metrics() as recs:
        case.run(inputs)
    seconds = time.perf_counter() - t0
    if not recs:
        raise RuntimeError(f"{case.op}: no kernel ran on the executor (is the op's kernel built?)")
    ideal_read, ideal_write = (int(x) for x in case.ideal(inputs))
    read = 32 * (_sum(recs, "global_load", "sectors") + _sum(recs, "global_atomic", "sectors"))
    write = 32 * (_sum(recs, "global_store", "sectors") + _sum(recs, "global_atomic", "sectors"))
    shared_w = _sum(recs, "shared_load", "wavefronts") + _sum(recs, "shared_store", "wavefronts")
    shared_min = _sum(recs, "shared_load", "wavefronts_min") + _sum(recs, "shared_store", "wavefronts_min")
    kernels: list[str] = []
    for r in recs:
        if r["kernel"] not in kernels:
            kernels.append(r["kernel"])
    sites = [dict(s, kernel=r["kernel"]) for r in recs for s in r["sites"]]
    unit = {k: ("sectors" if k.startswith("global") else "wavefronts") for k in {s["kind"] for s in sites}}
    merged: dict[tuple, dict] = {}
    for s in sites:  # one line per instruction over all launches
        u = unit[s["kind"]]
        m = merged.setdefault((s["where"], s["kind"]), {"where": s["where"], "kind": s["kind"], "requests": 0,
                                                        "bytes": 0, u: 0, u + "_min": 0})
        for k in ("requests", "bytes", u, u + "_min"):
            m[k] += s[k]
    worst = sorted(merged.values(), key=lambda s: -(s.get("sectors", s.get("wavefronts", 0))
                                                   - s.get("sectors_min", s.get("wavefronts_min", 0))))
    worst = [s for s in worst if s.get("sectors", s.get("wavefronts", 0)) > s.get("sectors_min", s.get("wavefronts_min", 0))]
    collectives: dict[str, int] = {}
    for r in recs:
        for k, v in r["collectives"].items():
            collectives[k] = collectives.get(k, 0) + v
    res = Result(
        op=case.op, label=case.label, headline=case.headline, memory_bound=case.memory_bound,
        ideal_doc=case.ideal_doc, seconds=round(seconds, 2), kernels=kernels, launches=len(recs),
        ideal_read=ideal_read, ideal_write=ideal_write, read_bytes=read, write_bytes=write,
        unique_read_bytes=sum(int(r["global_load_unique_bytes"]) for r in recs),
        unique_write_bytes=sum(int(r["global_store_unique_bytes"]) for r in recs),
        read_ratio=_ratio(read, ideal_read), write_ratio=_ratio(write, ideal_write),
        bytes_ratio=_ratio(read + write, ideal_read + ideal_write),
        load_sectors_ratio=_ratio(_sum(recs, "global_load", "sectors"), _sum(recs, "global_load", "sectors_min")),
        store_sectors_ratio=_ratio(_sum(recs, "global_store", "sectors"), _sum(recs, "global_store", "sectors_min")),
        shared_ratio=_ratio(shared_w, shared_min),
        ldmatrix_ratio=_ratio(_sum(recs, "ldmatrix", "wavefronts"), _sum(recs, "ldmatrix", "wavefronts_min")),
        wgmma_ratio=_ratio(_sum(recs, "wgmma", "wavefronts"), _sum(recs, "wgmma", "wavefronts_min")),
        barriers_per_launch=sum(r["barriers"] for r in recs) / len(recs),
        collectives=collectives, worst_sites=worst[:6],
    )
    res.misses = misses(res)
    res.known_misses = sorted(set(res.misses) & KNOWN_MISSES.get(case.op, set()))
    return res


def misses(r: Result) -> list[str]:
    """The targets this result misses (module docstring)."""
    out = []
    if r.memory_bound:
        # Reads, and all traffic: the writes alone can be far above their ideal and still not
        # matter (split-K decode writes fp32 partials several times its bf16 output, which is
        # a fraction of a percent of the bytes it reads).
        if r.read_ratio is not None and r.read_ratio > BYTES_TARGET:
            out.append("read bytes")
        if r.bytes_ratio is not None and r.bytes_ratio > BYTES_TARGET:
            out.append("total bytes")
        for name, x in (("load coalescing", r.load_sectors_ratio), ("store coalescing", r.store_sectors_ratio)):
            if x is not None and x > SECTORS_TARGET:
                out.append(name)
    else:
        for name, x in (("ldmatrix conflicts", r.ldmatrix_ratio), ("wgmma conflicts", r.wgmma_ratio)):
            if x is not None and x > 1.0:
                out.append(name)
    return out


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def table(results: list[Result]) -> str:
    head = ("op", "sizes", "kernels", "bytes/ideal", "read/ideal", "write/ideal", "ld sect/min", "st sect/min",
            "smem wf/min", "ldmatrix", "wgmma", "bar/launch", "check")
    rows = [head]
    for r in results:
        unexplained = [m for m in r.misses if m not in r.known_misses]
        check = "ok" if not r.misses else ("MISS: " if unexplained else "known: ") + ", ".join(r.misses)
        rows.append((r.op, r.label, str(r.launches), _fmt(r.bytes_ratio), _fmt(r.read_ratio), _fmt(r.write_ratio),
                     _fmt(r.load_sectors_ratio), _fmt(r.store_sectors_ratio), _fmt(r.shared_ratio),
                     _fmt(r.ldmatrix_ratio), _fmt(r.wgmma_ratio), f"{r.barriers_per_launch:.0f}", check))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def run_report(scale: str = "ci", ops: list[str] | None = None, seed: int = 0,
               progress=None) -> list[Result]:
    """Measures every case of ``scale`` ("ci": seconds per op; "report": the scaled headline
    shapes) whose op is in ``ops`` (default: all)."""
    from inferops.simt_report_cases import CASES

    results = []
    for case in CASES[scale]:
        if ops and case.op not in ops:
            continue
        gen = torch.Generator().manual_seed(seed)
        r = measure(case, gen)
        if progress:
            progress(r)
        results.append(r)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m inferops simt-report",
                                description="memory-efficiency metrics of every kernel, from the CPU SIMT executor")
    p.add_argument("--scale", choices=("ci", "report"), default="ci",
                   help="ci: small shapes, seconds per op; report: the scaled headline shapes")
    p.add_argument("--ops", default="", help="comma-separated ops (default: all)")
    p.add_argument("--out", default=None,
                   help="directory for metrics.jsonl and report.txt (default with --scale report: "
                        "bench/results/<date>-cpu-executor)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from inferops.testing import simt_metrics_available

    if not simt_metrics_available():
        print("simt-report needs the instrumented executor build: `RACE=1 scripts/dev_build.sh _simt`, then "
              "INFEROPS_SIMT_MODULE=$PWD/build/dev-race/_simt*.so python -m inferops simt-report", file=sys.stderr)
        return 2
    out = args.out
    if out is None and args.scale == "report":
        out = os.path.join("bench", "results", f"{datetime.date.today().isoformat()}-cpu-executor")
    ops = [o for o in args.ops.split(",") if o]
    print(f"inferops simt-report: scale {args.scale}; executor metrics (counts of the access pattern), not times",
          flush=True)
    results = run_report(args.scale, ops, args.seed,
                         progress=lambda r: print(f"  {r.op}: {r.seconds:.1f} s", flush=True))
    text = table(results)
    print(text)
    unexplained = [(r.op, m) for r in results for m in r.misses if m not in r.known_misses]
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "metrics.jsonl"), "w") as f:
            for r in results:
                f.write(json.dumps(asdict(r)) + "\n")
        with open(os.path.join(out, "report.txt"), "w") as f:
            f.write(f"python -m inferops simt-report --scale {args.scale} (seed {args.seed}); CPU SIMT executor "
                    f"metrics, torch {torch.__version__}\n\n{text}\n")
        print(f"wrote {out}/metrics.jsonl and report.txt")
    if unexplained:
        print("targets missed (not explained in docs/developer.md): "
              + "; ".join(f"{o}: {m}" for o, m in unexplained), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
