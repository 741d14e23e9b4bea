// Microbenchmark for the merge_states kernel, without Python in the loop.
//
//   bench_merge_states [num_tokens num_heads head_dim [dtype: bf16|fp16|fp32]]
//
// Times launch_merge_states with CUDA events (median of 200 after warm-up),
// rotating input sets so their total exceeds 2x L2, and a device-to-device
// cudaMemcpy of a 1 GiB buffer in the same run as the bandwidth ceiling.
// Prints time, GB/s (bytes read + written) and percent of the copy rate.
// Built with -DINFEROPS_BUILD_BENCH=ON (see docs/developer.md).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "attention/merge_states.h"
#include "common/cuda_check.h"
#include "common/launch.h"

using inferops::DType;

namespace {

// Deterministic pseudo-random fill in [-2, 2) (never time on zeros).
__global__ void FillKernel(void* p, int64_t n, DType dtype, uint32_t seed, float scale) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 13;
    h *= 0x5bd1e995u;
    h ^= h >> 15;
    const float x = scale * (float(h & 0xffffff) / float(1 << 24) * 4.f - 2.f);
    if (dtype == DType::kFloat32) static_cast<float*>(p)[i] = x;
    if (dtype == DType::kFloat16) static_cast<__half*>(p)[i] = __float2half(x);
    if (dtype == DType::kBFloat16) static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16(x);
  }
}

void fill(void* p, int64_t n, DType dtype, uint32_t seed, float scale = 1.f) {
  FillKernel<<<1024, 256>>>(p, n, dtype, seed, scale);
  INFEROPS_CUDA_CHECK_LAUNCH();
}

template <typename F>
float median_ms(F&& f, int iters) {
  cudaEvent_t a, b;
  INFEROPS_CUDA_CHECK(cudaEventCreate(&a));
  INFEROPS_CUDA_CHECK(cudaEventCreate(&b));
  std::vector<float> t(iters);
  for (int i = 0; i < 5; ++i) f(i);
  for (int i = 0; i < iters; ++i) {
    INFEROPS_CUDA_CHECK(cudaEventRecord(a));
    f(i);
    INFEROPS_CUDA_CHECK(cudaEventRecord(b));
    INFEROPS_CUDA_CHECK(cudaEventSynchronize(b));
    INFEROPS_CUDA_CHECK(cudaEventElapsedTime(&t[i], a, b));
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(t.begin(), t.end());
  return t[iters / 2];
}

}  // namespace

int main(int argc, char** argv) {
  try {
    int64_t T = 2048, H = 32, D = 128;
    std::string dt = "bf16";
    if (argc >= 4) {
      T = std::atoll(argv[1]);
      H = std::atoll(argv[2]);
      D = std::atoll(argv[3]);
    }
    if (argc >= 5) dt = argv[4];
    const DType dtype = dt == "fp32" ? DType::kFloat32 : dt == "fp16" ? DType::kFloat16 : DType::kBFloat16;
    if (T <= 0 || H <= 0 || D <= 0 || (dt != "fp32" && dt != "fp16" && dt != "bf16")) {
      std::fprintf(stderr, "usage: %s [num_tokens num_heads head_dim [bf16|fp16|fp32]]\n", argv[0]);
      return 2;
    }
    int device = 0;
    INFEROPS_CUDA_CHECK(cudaGetDevice(&device));
    cudaDeviceProp prop{};
    INFEROPS_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));

    // Ceiling: device-to-device copy of 1 GiB.
    const size_t copy_bytes = size_t(1) << 30;
    void *src = nullptr, *dst = nullptr;
    INFEROPS_CUDA_CHECK(cudaMalloc(&src, copy_bytes));
    INFEROPS_CUDA_CHECK(cudaMalloc(&dst, copy_bytes));
    fill(src, copy_bytes / 4, DType::kFloat32, 1);
    const float copy_ms = median_ms(
        [&](int) { INFEROPS_CUDA_CHECK(cudaMemcpyAsync(dst, src, copy_bytes, cudaMemcpyDeviceToDevice)); },
        20);
    const double copy_gbps = 2.0 * copy_bytes / (copy_ms * 1e-3) / 1e9;
    INFEROPS_CUDA_CHECK(cudaFree(src));
    INFEROPS_CUDA_CHECK(cudaFree(dst));

    const int es = inferops::dtype_size(dtype);
    const int64_t n = T * H * D, rows = T * H;
    const double bytes = 3.0 * n * es + 3.0 * rows * 4;
    const int sets = int(std::max<int64_t>(1, std::min<int64_t>(16, (2 * int64_t(prop.l2CacheSize)) / int64_t(bytes) + 1)));
    std::vector<inferops::attention::MergeStatesParams> params(sets);
    std::vector<void*> allocations;
    for (int s = 0; s < sets; ++s) {
      void *va, *vb, *vo, *la, *lb, *lo;
      for (void** p : {&va, &vb, &vo}) INFEROPS_CUDA_CHECK(cudaMalloc(p, n * es));
      for (void** p : {&la, &lb, &lo}) INFEROPS_CUDA_CHECK(cudaMalloc(p, rows * 4));
      fill(va, n, dtype, 10 * s + 1);
      fill(vb, n, dtype, 10 * s + 2);
      fill(la, rows, DType::kFloat32, 10 * s + 3, 2.f);
      fill(lb, rows, DType::kFloat32, 10 * s + 4, 2.f);
      allocations.insert(allocations.end(), {va, vb, vo, la, lb, lo});
      auto& p = params[s];
      p = {};
      p.v_a = va; p.v_b = vb; p.v_out = vo;
      p.lse_a = static_cast<float*>(la); p.lse_b = static_cast<float*>(lb);
      p.lse_out = static_cast<float*>(lo);
      p.num_tokens = T; p.num_heads = H; p.head_dim = D;
      for (int64_t* st : {p.v_a_stride, p.v_b_stride, p.v_out_stride}) { st[0] = H * D; st[1] = D; }
      for (int64_t* st : {p.lse_a_stride, p.lse_b_stride, p.lse_out_stride}) { st[0] = H; st[1] = 1; }
    }
    const float ms = median_ms(
        [&](int i) { inferops::attention::launch_merge_states(params[i % sets], dtype, device, 0); }, 200);
    INFEROPS_CUDA_CHECK(cudaDeviceSynchronize());
    const double gbps = bytes / (ms * 1e-3) / 1e9;
    std::printf("device %s | merge_states T=%lld H=%lld D=%lld %s | %.2f us | %.1f GB/s | %.1f%% of copy (%.0f GB/s) | %d input sets\n",
                prop.name, (long long)T, (long long)H, (long long)D, dt.c_str(), ms * 1e3, gbps,
                100.0 * gbps / copy_gbps, copy_gbps, sets);
    for (void* p : allocations) INFEROPS_CUDA_CHECK(cudaFree(p));
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_merge_states: %s\n", e.what());
    return 1;
  }
}
