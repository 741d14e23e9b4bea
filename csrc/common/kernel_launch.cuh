// One kernel source, two targets: the conventions that let every .cu file in csrc/
// compile unchanged with nvcc (GPU) and with g++ for the CPU SIMT executor
// (csrc/simt/, INFEROPS_SIMT defined). Kernels never use <<<>>> or `extern __shared__`
// directly; they go through these two, and every inline PTX instruction lives in a typed
// wrapper in csrc/common/ (mma.cuh, cp_async.cuh, ptx.cuh) with an executor implementation
// beside its `asm`.
//
//   INFEROPS_DYNAMIC_SMEM(float, smem, 16);      // extern __shared__ __align__(16) float smem[];
//   launch_kernel(FooKernel<T>, grid, block, smem_bytes, stream, params);
//   INFEROPS_CUDA_CHECK(launch_kernel_cluster(FooKernel<T>, grid, block, smem_bytes, stream,
//                                             cluster_dims, params));  // thread-block clusters
//
// launch_kernel only launches: callers still end with INFEROPS_CUDA_CHECK_LAUNCH(), which
// reports a rejected configuration on both targets (the executor sets the same
// cudaGetLastError() codes as the CUDA runtime, with its own message).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <utility>

#ifdef INFEROPS_SIMT
// The executor gives each running block its own dynamic shared-memory window (poisoned at
// block start, guarded past the launch's size); `align` is honoured by its 1024-byte base.
#define INFEROPS_DYNAMIC_SMEM(T, name, align) T* const name = reinterpret_cast<T*>(::simt::dynamic_smem())
#else
#define INFEROPS_DYNAMIC_SMEM(T, name, align) extern __shared__ __align__(align) T name[]
#endif

namespace inferops {

// Launch `kernel` on `grid` x `block` with `smem_bytes` of dynamic shared memory on `stream`.
// Arguments convert to the kernel's parameter types as with <<<>>>.
template <typename... Params, typename... Args>
inline void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t smem_bytes,
                          cudaStream_t stream, Args&&... args) {
#ifdef INFEROPS_SIMT
  ::simt::launch(kernel, ::simt::LaunchConfig{grid, block, smem_bytes, dim3(1, 1, 1)}, std::forward<Args>(args)...);
  (void)stream;
#else
  kernel<<<grid, block, smem_bytes, stream>>>(std::forward<Args>(args)...);
#endif
}

// Launch `kernel` as thread-block clusters of `cluster` blocks (sm_90+; grid must be a whole
// number of clusters). A cluster of one block launches without the attribute. Returns the
// launch's error (cudaLaunchKernelEx's result; the executor's check codes are the same).
template <typename... Params, typename... Args>
inline cudaError_t launch_kernel_cluster(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t smem_bytes,
                                         cudaStream_t stream, dim3 cluster, Args&&... args) {
#ifdef INFEROPS_SIMT
  (void)stream;
  return ::simt::launch(kernel, ::simt::LaunchConfig{grid, block, smem_bytes, cluster}, std::forward<Args>(args)...);
#else
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem_bytes;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cluster.x;
  attr[0].val.clusterDim.y = cluster.y;
  attr[0].val.clusterDim.z = cluster.z;
  cfg.attrs = attr;
  cfg.numAttrs = cluster.x * cluster.y * cluster.z > 1 ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
#endif
}

}  // namespace inferops
