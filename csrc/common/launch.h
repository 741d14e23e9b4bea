// Launch helpers: device properties read from the device (never hard-coded:
// an H100 SXM has 132 SMs, a PCIe H100 114, an H200 132, an A100 108), cached
// per device because cudaGetDeviceProperties costs ~1 ms; and a device guard
// so launchers run on the device that owns the tensors, whatever the calling
// thread's current device is.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_check.h"

namespace inferops {

struct DeviceInfo {
  int device = 0;
  int sm_count = 0;
  int cc_major = 0;
  int cc_minor = 0;
  int max_threads_per_sm = 0;
  int max_smem_per_block_optin = 0;  // bytes a block may use after cudaFuncSetAttribute
  int max_smem_per_sm = 0;           // bytes
  int l2_bytes = 0;
};

// Properties of `device`, read once per process.
const DeviceInfo& device_info(int device);

// Makes `device` current for the scope and restores the previous one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

// Raises a kernel's dynamic shared-memory limit when it needs more than 48 KiB,
// after checking the device can give that much. The attribute is only raised, once
// per (kernel, device) and larger size: launchers call this on every launch, and a
// CUDA API call per launch is host overhead a decode step cannot afford.
void set_dynamic_smem_raw(const void* kernel, int bytes, int device);
template <typename Kernel>
void set_dynamic_smem(Kernel kernel, int bytes, int device) {
  set_dynamic_smem_raw(reinterpret_cast<const void*>(kernel), bytes, device);
}

// Resident blocks per SM of `kernel` at `threads` x `smem_bytes` (occupancy query,
// cached per (kernel, device, threads, bytes)). Set the shared-memory limit first.
int max_active_blocks_raw(const void* kernel, int threads, int smem_bytes, int device);
template <typename Kernel>
int max_active_blocks(Kernel kernel, int threads, int smem_bytes, int device) {
  return max_active_blocks_raw(reinterpret_cast<const void*>(kernel), threads, smem_bytes, device);
}

inline cudaStream_t as_stream(std::uintptr_t handle) {
  return reinterpret_cast<cudaStream_t>(handle);
}

}  // namespace inferops
