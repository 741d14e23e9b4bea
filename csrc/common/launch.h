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
// after checking the device can give that much.
template <typename Kernel>
void set_dynamic_smem(Kernel kernel, int bytes, int device) {
  const DeviceInfo& info = device_info(device);
  INFEROPS_CHECK(bytes <= info.max_smem_per_block_optin, "kernel needs ", bytes,
                 " bytes of shared memory, device ", device, " allows ",
                 info.max_smem_per_block_optin);
  if (bytes > 48 * 1024) {
    INFEROPS_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  }
}

inline cudaStream_t as_stream(std::uintptr_t handle) {
  return reinterpret_cast<cudaStream_t>(handle);
}

}  // namespace inferops
