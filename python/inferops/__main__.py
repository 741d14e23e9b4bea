"""``python -m inferops``: the main job, and the op check.

``python -m inferops [generate] [options]`` (console script ``inferops-generate``) runs
the batch engine (:mod:`inferops.batch.cli`): offline generation with global prefix
sharing, on a local checkpoint (``--model PATH``) or a small random-weight model.

``python -m inferops check [options]`` (console script ``inferops-check``): what is
available here, and every op checked and timed.

``python -m inferops simt-report [options]``: memory-efficiency metrics of every kernel
from the CPU SIMT executor's instrumented build (:mod:`inferops.simt_report`).

Prints the backend (CUDA kernels or PyTorch reference) and the build info,
then for every registered demo: the op on fresh random inputs, its maximum
error against the float64 reference (and whether it is within the shared
tolerance), its time and the time of its baseline measured in the same run.
Exits non-zero if any op fails its check. Works on a CPU-only machine.

``--backend simt`` runs the ops on CPU tensors through the real kernels on the CPU
SIMT executor (``inferops._simt``): the check column then judges the kernels
themselves; their times are simulation times, not performance.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


def _outputs(x):
    return list(x) if isinstance(x, (tuple, list)) else [x]


def main(argv=None) -> int:
    """``python -m inferops``: ``check`` runs the op table; anything else (or nothing) the
    main job, ``generate``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["check"]:
        return check_main(argv[1:])
    if argv[:1] == ["simt-report"]:
        from inferops.simt_report import main as report_main

        return report_main(argv[1:])
    if any(a.split("=")[0] in ("--iters", "--backend") for a in argv):
        # the op table's own flags: `python -m inferops --backend simt` as before the main job moved
        return check_main(argv)
    from inferops.batch.cli import main as generate_main

    return generate_main(argv[1:] if argv[:1] == ["generate"] else argv)


def check_main(argv=None) -> int:
    """Every registered op checked against its float64 reference and timed (``inferops-check``)."""
    p = argparse.ArgumentParser(prog="python -m inferops check",
                                description="what is available here, and every op checked and timed")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--iters", type=int, default=None, help="timed calls per op (default 50; 2 with --backend simt)")
    p.add_argument("--backend", choices=("auto", "reference", "simt"), default="auto",
                   help="what ops on CPU tensors run: the PyTorch reference (auto) or the kernels on the "
                        "CPU SIMT executor (simt)")
    args = p.parse_args(argv)
    if args.backend == "simt":
        if args.device not in (None, "cpu"):
            p.error("--backend simt runs the kernels on CPU tensors: use --device cpu (or leave it out)")
        args.device = "cpu"
        from inferops.testing import backend

        with backend("simt"):
            return _run(args, simulated=True)
    if args.backend == "reference":
        from inferops.testing import backend

        with backend("reference"):
            return _run(args, simulated=False)
    return _run(args, simulated=False)


def _run(args, simulated: bool) -> int:
    if args.iters is None:
        args.iters = 2 if simulated else 50
    import inferops
    from inferops._core.demos import DEMOS
    from inferops._core.ops import kernel_backend
    from inferops.benchmark import device_name

    info = inferops.build_info()
    reason = inferops.cuda_unavailable_reason()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"inferops {inferops.__version__} | torch {torch.__version__} | device {device_name(device)}")
    if info["extension_loaded"]:
        print(f"extension: CUDA {'yes' if info['cuda'] else 'no'}"
              + (f" {info['cuda_version']}, archs {info['cuda_archs']}, kernels: "
                 f"{', '.join(info['cuda_ops']) or 'none'}" if info["cuda"] else "")
              + f"; host compiler {info['host_compiler']}")
    else:
        print(f"extension: not loaded ({info['error']})")
    if simulated:
        print("backend: the CUDA kernels on the CPU SIMT executor (inferops._simt); times are "
              "simulation times, not performance")
    else:
        print("backend: " + ("CUDA kernels" if reason is None and device.type == "cuda"
                             else f"PyTorch reference ({reason or 'CPU tensors'})"))
    print()

    seed = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed)
    time_col = "sim time (us)" if simulated else "time (us)"
    header = ("op", "backend", "sizes", "dtype", "max err", "check", time_col, "baseline (us)", "speedup")
    rows = []
    failed = 0
    for demo in DEMOS:
        try:
            row, ok = _check_demo(demo, device, g, seed, args, simulated)
        except Exception as e:  # one broken op must not hide the others' results
            not_modelled = simulated and "not modelled by the SIMT executor" in str(e)
            row = (demo.op, kernel_backend(demo.op, device), demo.sizes(device),
                   str(demo.dtype).replace("torch.", ""), "-", "not run" if not_modelled else "ERROR",
                   "-", "-", "-")
            ok = not_modelled
            print(f"[inferops] {demo.op}: {type(e).__name__}: {e}", file=sys.stderr)
        rows.append(row)
        failed += 0 if ok else 1
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    not_run = sum(r[5] == "not run" for r in rows)
    print(f"\n{len(rows) - failed - not_run} of {len(rows)} ops within tolerance of the float64 reference "
          f"(seed {seed}"
          + (f"; {not_run} not run: the executor does not model what they need" if not_run else "")
          + "); baseline = the op's PyTorch reference, timed in the same run.")
    return 1 if failed else 0


def _check_demo(demo, device, g, seed, args, simulated):
    """One table row for `demo`, and whether it passed its check."""
    from inferops._core.ops import kernel_backend
    from inferops.benchmark import time_fn
    from inferops.testing import assert_close, max_abs_error

    inputs = demo.make_inputs(device, g)
    ref = _outputs(demo.reference64(*inputs))  # first: in-place ops overwrite inputs
    out = _outputs(demo.run(*inputs))
    err = max(max_abs_error(o, r) for o, r in zip(out, ref))
    ok = True
    try:
        for i, (o, r) in enumerate(zip(out, ref)):
            tol = (demo.tolerance or demo.dtype) if i == 0 else (demo.aux_tolerance or o.dtype)
            assert_close(o, r, tol, name=f"{demo.op} output {i}", seed=seed)
    except AssertionError as e:
        ok = False
        print(f"[inferops] {e}", file=sys.stderr)
    warmup = 0 if simulated else 10
    t = time_fn(demo.run, [inputs], iters=args.iters, warmup=warmup)
    tb = time_fn(demo.baseline, [inputs], iters=args.iters, warmup=warmup)
    row = (demo.op, kernel_backend(demo.op, device), demo.sizes(device),
           str(demo.dtype).replace("torch.", ""), f"{err:.2e}", "ok" if ok else "FAIL",
           f"{t.median_us:.1f}", f"{tb.median_us:.1f}",
           "n/a (simulated)" if simulated else f"x{tb.median_us / t.median_us:.2f}")
    return row, ok


if __name__ == "__main__":
    sys.exit(main())
