#!/usr/bin/env bash
# Build, on this (GPU-less) machine, everything the GPU machine needs so that
# it builds nothing there:
#   .gpu/wheels/inferops-*-cp312-*.whl   the package for the GPU machine's Python 3.12, with the
#                                        C++ microbenchmarks in inferops/bin/bench_<family>
#                                        (INFEROPS_BUILD_BENCH=1; run by `inferops-bench`)
#   .gpu/peers/*.whl                     peers to benchmark against (fla-core, pure Python)
# .gpu/ is git-ignored; name it in the device tool's `carry`.
#
# Environment: INFEROPS_CUDA_ARCHS (default 90a), PYTHON312 (default: pyenv's 3.12.1),
# CUDACXX (default /usr/local/cuda/bin/nvcc).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON312=${PYTHON312:-$(pyenv root 2>/dev/null)/versions/3.12.1/bin/python}
export CUDACXX=${CUDACXX:-/usr/local/cuda/bin/nvcc}
export INFEROPS_CUDA_ARCHS=${INFEROPS_CUDA_ARCHS:-90a}
export INFEROPS_REQUIRE_CUDA=1   # a host-only wheel would be useless there: fail instead
[ -x "$PYTHON312" ] || { echo "build_gpu_wheel: no Python 3.12 at $PYTHON312 (set PYTHON312)" >&2; exit 1; }
[ -x "$CUDACXX" ] || { echo "build_gpu_wheel: no nvcc at $CUDACXX (set CUDACXX)" >&2; exit 1; }

start=$(date +%s)
rm -rf .gpu/wheels .gpu/bin .gpu/peers
mkdir -p .gpu/wheels .gpu/peers
# The benchmark binaries go into the wheel (inferops/bin/): the kernels compile once.
INFEROPS_BUILD_BENCH=1 "$PYTHON312" -m pip wheel --no-deps -w .gpu/wheels . -q
wheel=$(ls .gpu/wheels/inferops-*-cp312-*.whl)
"$PYTHON312" - "$wheel" <<'PY'
import sys, zipfile
zf = zipfile.ZipFile(sys.argv[1])
names = zf.namelist()
so = [n for n in names if n.startswith("inferops/_C") and n.endswith(".so")]
assert so and "cpython-312" in so[0], f"no cp312 extension in {sys.argv[1]}: {names}"
for fam in ("attention", "linear_attention", "quant", "moe", "tp"):
    info = zf.getinfo(f"inferops/bin/bench_{fam}")  # KeyError: the binary is missing
    assert (info.external_attr >> 16) & 0o111, f"inferops/bin/bench_{fam} is not executable in the wheel"
print("wheel:", sys.argv[1], "->", so[0], "+ inferops/bin/bench_*")
PY
# fla (flash-linear-attention) for the causal linear-attention benchmark: 1 MB,
# needs only einops/torch/triton, which the GPU machine has. Best effort.
"$PYTHON312" -m pip download -q --no-deps -d .gpu/peers fla-core==0.6.0 \
  || echo "build_gpu_wheel: could not download fla-core; the fla baseline will be skipped" >&2
echo "built .gpu/ in $(( $(date +%s) - start )) s: $(du -sh .gpu | cut -f1)"
