// Launch helpers; see launch.h.
#include "launch.h"

#include <array>
#include <mutex>

namespace inferops {

namespace {
constexpr int kMaxDevices = 64;
std::array<DeviceInfo, kMaxDevices> g_info;
std::array<std::once_flag, kMaxDevices> g_once;
}  // namespace

const DeviceInfo& device_info(int device) {
  INFEROPS_CHECK_ARG(device >= 0 && device < kMaxDevices, "device index ", device,
                     " out of range [0, ", kMaxDevices, ")");
  std::call_once(g_once[device], [device] {
    DeviceInfo& d = g_info[device];
    d.device = device;
    auto attr = [device](cudaDeviceAttr a) {
      int v = 0;
      INFEROPS_CUDA_CHECK(cudaDeviceGetAttribute(&v, a, device));
      return v;
    };
    d.sm_count = attr(cudaDevAttrMultiProcessorCount);
    d.cc_major = attr(cudaDevAttrComputeCapabilityMajor);
    d.cc_minor = attr(cudaDevAttrComputeCapabilityMinor);
    d.max_threads_per_sm = attr(cudaDevAttrMaxThreadsPerMultiProcessor);
    d.max_smem_per_block_optin = attr(cudaDevAttrMaxSharedMemoryPerBlockOptin);
    d.max_smem_per_sm = attr(cudaDevAttrMaxSharedMemoryPerMultiprocessor);
    d.l2_bytes = attr(cudaDevAttrL2CacheSize);
  });
  return g_info[device];
}

DeviceGuard::DeviceGuard(int device) {
  int current = -1;
  INFEROPS_CUDA_CHECK(cudaGetDevice(&current));
  if (current != device) {
    INFEROPS_CUDA_CHECK(cudaSetDevice(device));
    previous_ = current;
  }
}

DeviceGuard::~DeviceGuard() {
  if (previous_ >= 0) cudaSetDevice(previous_);  // destructors must not throw
}

}  // namespace inferops
