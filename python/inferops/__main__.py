"""``python -m inferops``: what is available here, and every op checked and timed.

Prints the backend (CUDA kernels or PyTorch reference) and the build info,
then for every registered demo: the op on fresh random inputs, its maximum
error against the float64 reference (and whether it is within the shared
tolerance), its time and the time of its baseline measured in the same run.
Exits non-zero if any op fails its check. Works on a CPU-only machine.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


def _outputs(x):
    return list(x) if isinstance(x, (tuple, list)) else [x]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m inferops", description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--iters", type=int, default=50)
    args = p.parse_args(argv)

    import inferops
    from inferops._core.demos import DEMOS
    from inferops._core.ops import kernel_backend
    from inferops.benchmark import device_name, time_fn
    from inferops.testing import assert_close, max_abs_error

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
    print("backend: " + ("CUDA kernels" if reason is None else f"PyTorch reference ({reason})"))
    print()

    seed = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed)
    header = ("op", "backend", "sizes", "dtype", "max err", "check", "time (us)", "baseline (us)", "speedup")
    rows = []
    failed = 0
    for demo in DEMOS:
        inputs = demo.make_inputs(device, g)
        ref = _outputs(demo.reference64(*inputs))  # first: in-place ops overwrite inputs
        out = _outputs(demo.run(*inputs))
        err = max(max_abs_error(o, r) for o, r in zip(out, ref))
        try:
            for i, (o, r) in enumerate(zip(out, ref)):
                tol = demo.dtype if i == 0 else (demo.aux_tolerance or o.dtype)
                assert_close(o, r, tol, name=f"{demo.op} output {i}", seed=seed)
            verdict = "ok"
        except AssertionError as e:
            verdict = "FAIL"
            failed += 1
            print(f"[inferops] {e}", file=sys.stderr)
        t = time_fn(demo.run, [inputs], iters=args.iters)
        tb = time_fn(demo.baseline, [inputs], iters=args.iters)
        rows.append((demo.op, kernel_backend(demo.op, device), demo.sizes(device),
                     str(demo.dtype).replace("torch.", ""), f"{err:.2e}", verdict,
                     f"{t.median_us:.1f}", f"{tb.median_us:.1f}", f"x{tb.median_us / t.median_us:.2f}"))
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print(f"\n{len(rows) - failed} of {len(rows)} ops within tolerance of the float64 reference "
          f"(seed {seed}); baseline = the op's PyTorch reference, timed in the same run.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
