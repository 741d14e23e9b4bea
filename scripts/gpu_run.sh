#!/usr/bin/env bash
# Run on the offline GPU machine (Python 3.12, torch 2.11+cu130, no network),
# from the repository root, after scripts/build_gpu_wheel.sh ran on the build
# machine and .gpu/ travelled with the tree:
#
#   bash scripts/gpu_run.sh [RESULTS_DIR]        (or INFEROPS_RESULTS_DIR=...)
#
# Installs the wheel without network, then runs: the main job, `pytest -m gpu`,
# every benchmark (Python and C++), and compute-sanitizer memcheck on a reduced
# GPU test selection (skip with INFEROPS_SKIP_SANITIZER=1: with every family
# built, a first run without it fits a 15-minute lease better; run it second).
# INFEROPS_GPU_STEPS picks steps (comma list of main,tests,bench,cpp,sanitizer;
# default all), e.g. tests in a first call and bench in a second; INFEROPS_GPU_TESTS
# narrows the GPU tests (pytest paths/-k words, default "tests"), e.g. "tests/quant tests/tp". Everything goes
# under RESULTS_DIR (at most 8 files, flat, so the device tool brings them all
# back); a short table is printed last. Exit code: non-zero if a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-${INFEROPS_RESULTS_DIR:-bench/results/gpu-$(date -u +%Y%m%d-%H%M%S)}}
mkdir -p "$DIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
status=()
STEPS=",${INFEROPS_GPU_STEPS:-main,tests,bench,cpp,sanitizer},"
want() { [[ "$STEPS" == *",$1,"* ]]; }
step() {  # step NAME LOGFILE TIMEOUT_S CMD...: run, log, record pass/fail
  local name=$1 log=$2 limit=$3; shift 3
  local t0=$(date +%s)
  echo "=== $name: $*" | tee -a "$DIR/$log"
  timeout "$limit" "$@" >> "$DIR/$log" 2>&1
  local rc=$?
  status+=("$(printf '%-22s rc=%-3s %4ss  %s' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$log")")
  tail -n 5 "$DIR/$log"
  return $rc
}

{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
} > "$DIR/env.txt" 2>&1
cat "$DIR/env.txt"

tag=cp$($PY -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
wheel=$(ls .gpu/wheels/inferops-*-"$tag"-*.whl 2>/dev/null | head -1)
if [ -z "$wheel" ]; then
  echo "gpu_run: no $tag wheel in .gpu/wheels: run scripts/build_gpu_wheel.sh first and carry .gpu" >&2
  exit 2
fi
step install env.txt 300 $PY -m pip install --no-index --no-deps --force-reinstall --no-compile -q "$wheel" || exit 3
if ls .gpu/peers/*.whl > /dev/null 2>&1; then  # peers for the benchmarks (fla-core)
  step install_peers env.txt 300 $PY -m pip install --no-index --no-deps --no-compile -q .gpu/peers/*.whl
fi

want main && step main_job main.log 300 $PY -m inferops check
# the batch engine (needs transformers + tqdm on the machine); random-weight model, synthetic workload
want main && step generate generate.log 300 $PY -m inferops generate --compare --out "$DIR/generate.jsonl"
# A hung kernel must not eat the lease: per-test limit when pytest-timeout is there.
per_test=()
$PY -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 240)
read -r -a test_paths <<< "${INFEROPS_GPU_TESTS:-tests}"
want tests && step pytest_gpu pytest.log 900 $PY -m pytest -m gpu "${test_paths[@]}" -q -rfEs -p no:cacheprovider "${per_test[@]}"
want bench && step bench bench.log 900 $PY bench/run_all.py --results-dir "$DIR" --compile-baseline
# C++ microbenchmarks (docs/bench.md), installed with the wheel (inferops/bin/bench_<family>,
# run through inferops-bench): --check first at the small check shapes (the kernels verified
# against the host references on the GPU too), then each family's default (target) shapes,
# one JSON object per case into cpp_bench.jsonl. INFEROPS_CPP_BENCH_ARGS adds flags.
if want cpp; then
  read -r -a cpp_args <<< "${INFEROPS_CPP_BENCH_ARGS:-}"
  $PY -m inferops.bench_cli --list | tee -a "$DIR/bench.log"
  for fam in attention linear_attention quant moe tp; do
    step "cpp_check_$fam" bench.log 300 $PY -m inferops.bench_cli "$fam" all --check
    step "cpp_bench_$fam" bench.log 600 $PY -m inferops.bench_cli "$fam" all --json="$DIR/cpp_bench.jsonl" "${cpp_args[@]}"
  done
fi
if want sanitizer && [ -z "${INFEROPS_SKIP_SANITIZER:-}" ] && command -v compute-sanitizer > /dev/null; then
  step memcheck sanitizer.log 600 compute-sanitizer --tool memcheck --error-exitcode 9 \
    $PY -m pytest -m gpu tests/attention -q -p no:cacheprovider \
    -k "writes_every_output or inplace_strided or nan_propagates or (matches_float64 and 19x3x64) \
        or (cuda_paged_decode and 3- and b4-g8) or unvalidated_stays_in_bounds or cuda_append_kv or poisoned \
        or (equals_reference_and_paged_decode and g2m3 and dtype0) or (equals_reference_and_paged_decode and G56 and dtype0)"
  step memcheck_linear sanitizer.log 600 compute-sanitizer --tool memcheck --error-exitcode 9 \
    $PY -m pytest -m gpu tests/linear_attention -q -p no:cacheprovider \
    -k "poisoned_output_and_module or varlen_and_steps or (cuda_matches_oracle and 65 and dtype0 and 64-100) \
        or (cuda_matches_float64 and 7x7 and 32 and dtype0) or cuda_fp16_state_beyond or cuda_fp16_continues_large"
  step memcheck_moe sanitizer.log 600 compute-sanitizer --tool memcheck --error-exitcode 9 \
    $PY -m pytest -m gpu tests/moe -q -p no:cacheprovider \
    -k "cuda_layout_errors_and_capacity or (cuda_permute_unpermute and 100 and dtype0) or (cuda_layout_equals_reference and T17) \
        or cuda_layout_shared_memory or cuda_layout_smaller_then_larger_shared_memory"
  step memcheck_quant sanitizer.log 600 compute-sanitizer --tool memcheck --error-exitcode 9 \
    $PY -m pytest -m gpu tests/quant -q -p no:cacheprovider \
    -k "split_counts or unaligned or graph_capture or (dequantize_is_exact and 112) \
        or (both_paths and 17 and not 4096) or (cuda_fused_matches and 640 and (-3- or -65-))"
  # tp: one rank only -- memcheck serialises kernels, so virtual ranks (which spin-wait
  # on each other's kernels) would time out under it.
  step memcheck_tp sanitizer.log 600 compute-sanitizer --tool memcheck --error-exitcode 9 \
    $PY -m pytest -m gpu tests/tp -q -p no:cacheprovider -k "one_rank_equals_matmul and 333"
  step memcheck_w8a8 sanitizer.log 600 compute-sanitizer --tool memcheck --error-exitcode 9 \
    $PY -m pytest -m gpu tests/quant/test_w8a8.py tests/quant/test_hadamard.py -q -p no:cacheprovider \
    -k "writes_every_output or (cuda_quantize_bit_exact and 5x100) or (cuda_matmul_matches_float64 and 129x208x100) \
        or (cuda_rotation_matches_float64 and (96 or 11008 or 28672) and dtype0)"
  # Experimental FP8 wgmma kernel (opt-in path="wgmma"): partial tiles, K tails, M = 1.
  step memcheck_w8a8_wgmma sanitizer.log 600 compute-sanitizer --tool memcheck --error-exitcode 9 \
    $PY -m pytest -m gpu tests/quant/test_w8a8_wgmma.py -q -p no:cacheprovider \
    -k "129x208x100 or 131x272x259 or 1x16x1 or 300x144x130 or 17x14336x4096"
fi

echo
echo "== results in $DIR"
[ -f "$DIR/summary.md" ] && cat "$DIR/summary.md"
[ -f "$DIR/pytest.log" ] && grep -E "passed|failed" "$DIR/pytest.log" | tail -1
echo "== steps"
printf '%s\n' "${status[@]}"
! printf '%s\n' "${status[@]}" | grep -qv "rc=0 "
