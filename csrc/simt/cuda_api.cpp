// The CUDA runtime API calls the launchers make (launch.cpp, bindings.cpp, launch_kernel*),
// implemented for the SIMT executor, which stands in for one H100 SXM (what the launchers
// size their grids for) and links no CUDA runtime: cudaGetLastError and friends, device
// attributes, cudaFuncSetAttribute, and cudaLaunchKernelExC (cluster launches; the kernel is
// called through the invoker its typed launch registered, simt.h launch_kernel_ex).
#include "simt/scheduler.h"

#include <algorithm>
#include <mutex>
#include <string>

namespace simt {

using namespace detail;

// ---- the CUDA runtime API calls of the launchers (launch.cpp, bindings.cpp) ---------------------------------------
int record_smem_attribute(const void* kernel, int bytes) {
  Scheduler& s = S();
  std::lock_guard<std::mutex> lock(s.lock);
  s.smem_attr[kernel] = bytes;
  return 0;
}

void record_nonportable_cluster(const void* kernel, int allowed) {
  Scheduler& s = S();
  std::lock_guard<std::mutex> lock(s.lock);
  s.nonportable[kernel] = allowed;
}

void register_invoker(const void* kernel, Invoker invoke) {
  Scheduler& s = S();
  std::lock_guard<std::mutex> lock(s.lock);
  s.invokers[kernel] = invoke;
}

// cudaLaunchKernelExC: the configuration's grid, block, dynamic shared memory and cluster
// dimension; the kernel is called through the invoker its typed launch registered.
cudaError_t launch_ex(const cudaLaunchConfig_t* config, const void* func, void** args) {
  if (!config || !func) return launch_error(cudaErrorInvalidValue, "cudaLaunchKernelEx: null config or kernel");
  LaunchConfig cfg;
  cfg.grid = config->gridDim;
  cfg.block = config->blockDim;
  cfg.smem_bytes = config->dynamicSmemBytes;
  for (unsigned i = 0; i < config->numAttrs; ++i) {
    const cudaLaunchAttribute& a = config->attrs[i];
    if (a.id == cudaLaunchAttributeClusterDimension) {
      cfg.cluster = dim3(a.val.clusterDim.x, a.val.clusterDim.y, a.val.clusterDim.z);
    } else {
      return launch_error(cudaErrorNotSupported,
                          "cudaLaunchKernelEx: launch attribute %d is not modelled by the SIMT executor (only "
                          "cudaLaunchAttributeClusterDimension)",
                          static_cast<int>(a.id));
    }
  }
  Invoker invoke = nullptr;
  {
    Scheduler& s = S();
    std::lock_guard<std::mutex> lock(s.lock);
    if (auto it = s.invokers.find(func); it != s.invokers.end()) invoke = it->second;
  }
  if (!invoke) {
    return launch_error(cudaErrorInvalidDeviceFunction,
                        "cudaLaunchKernelExC: the executor cannot call a kernel from `const void*` + `void**` unless "
                        "a typed launch registered it (launch through cudaLaunchKernelEx or "
                        "inferops::launch_kernel_cluster)");
  }
  return invoke(func, cfg, args);
}

}  // namespace simt

// The executor stands in for one H100 SXM (what the launchers size their grids for); it
// links no CUDA runtime, so these are the only definitions of the calls.
extern "C" {

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = simt::t_last_error;
  simt::t_last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError(void) { return simt::t_last_error; }
const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    case cudaErrorInvalidClusterSize: return "cudaErrorInvalidClusterSize";
    case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
    default: return "cudaError(simt)";
  }
}
const char* cudaGetErrorString(cudaError_t e) {
  if (e == cudaSuccess) return "no error";
  static thread_local std::string msg;
  msg = "(SIMT executor) " + simt::t_last_message;
  return msg.c_str();
}
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int) { return cudaSuccess; }
cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t cudaDriverGetVersion(int* v) {
  *v = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = 132; break;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = 2048; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = static_cast<int>(simt::detail::kMaxDynSmem); break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = 233472; break;
    case cudaDevAttrL2CacheSize: *value = 50 * 1024 * 1024; break;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    default: *value = 0; break;
  }
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || value > static_cast<int>(simt::detail::kMaxDynSmem)) {
      simt::set_launch_error(cudaErrorInvalidValue, "cudaFuncSetAttribute: dynamic shared memory size out of range");
      return cudaErrorInvalidValue;
    }
    simt::record_smem_attribute(func, value);
  } else if (attr == cudaFuncAttributeNonPortableClusterSizeAllowed) {
    simt::record_nonportable_cluster(func, value);
  }
  return cudaSuccess;
}
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void*, int block_size,
                                                          size_t smem) {
  int b = std::min(32, 2048 / std::max(block_size, 1));
  if (smem > 0) b = std::min(b, static_cast<int>(233472 / (smem + 1024)));
  *blocks = std::max(b, 0);
  return cudaSuccess;
}
cudaError_t cudaLaunchKernelExC(const cudaLaunchConfig_t* config, const void* func, void** args) {
  return simt::launch_ex(config, func, args);
}

}  // extern "C"
