// Launch helpers; see launch.h.
#include "launch.h"

#include <array>
#include <map>
#include <mutex>
#include <tuple>

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

void set_dynamic_smem_raw(const void* kernel, int bytes, int device) {
  const DeviceInfo& info = device_info(device);
  INFEROPS_CHECK(bytes <= info.max_smem_per_block_optin, "kernel needs ", bytes,
                 " bytes of shared memory, device ", device, " allows ",
                 info.max_smem_per_block_optin);
  if (bytes <= 48 * 1024) return;
  // The attribute is a limit: keep the largest size set per (kernel, device) and only ever
  // raise it. (Caching each exact size set, as before, let a smaller size lower the limit
  // and a later larger launch, already "done", skip raising it again: the launch then
  // failed with cudaErrorInvalidValue, e.g. routing_layout with R = 64, then 1, then 64.)
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, int> raised;
  std::lock_guard<std::mutex> lock(mu);
  int& limit = raised[{kernel, device}];
  if (bytes <= limit) return;
  INFEROPS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  limit = bytes;
}

int max_active_blocks_raw(const void* kernel, int threads, int smem_bytes, int device) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, int, int>, int> cache;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(kernel, device, threads, smem_bytes);
  const auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int per_sm = 0;
  INFEROPS_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem_bytes));
  cache.emplace(key, per_sm);
  return per_sm;
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
