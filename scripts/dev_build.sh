#!/usr/bin/env bash
# In-tree development build without pip: configures build/dev once, builds the given
# targets (default: both modules) and links them into python/inferops/, so that
#   PYTHONPATH=python python -m pytest ...
# runs this checkout. `scripts/dev_build.sh _simt` rebuilds only the CPU SIMT executor
# module (seconds after a kernel edit); SAN=1 builds the AddressSanitizer variant into
# build/dev-asan instead (use it with INFEROPS_SIMT_MODULE and the ASan runtime preloaded,
# as .ci/run does); RACE=1 builds the shared-memory race-check variant into build/dev-race
# (use it with INFEROPS_SIMT_MODULE; no preload).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${CUDACXX:-}" ] && command -v nvcc >/dev/null; then export CUDACXX=$(command -v nvcc); fi
dir=build/dev
extra=()
if [ "${SAN:-0}" = 1 ]; then dir=build/dev-asan; extra=(-DINFEROPS_SIMT_SANITIZE=ON); fi
if [ "${RACE:-0}" = 1 ]; then dir=build/dev-race; extra=(-DINFEROPS_SIMT_RACECHECK=ON); fi
if [ ! -f "$dir/build.ninja" ]; then
  version=$(python -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['version'])")
  cmake -S . -B "$dir" -G Ninja -DINFEROPS_BUILD_PYTHON=ON -DCMAKE_BUILD_TYPE=Release \
    -DSKBUILD_PROJECT_VERSION="$version" \
    -Dpybind11_DIR="$(python -c 'import pybind11; print(pybind11.get_cmake_dir())')" "${extra[@]}" >/dev/null
fi
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then targets=(_C _simt); fi
ninja -C "$dir" "${targets[@]}"
if [ "${SAN:-0}" != 1 ] && [ "${RACE:-0}" != 1 ]; then
  for t in "${targets[@]}"; do
    for so in "$dir"/"$t".*.so; do ln -sf "$PWD/$so" python/inferops/; done
  done
fi
