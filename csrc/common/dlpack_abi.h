// DLPack ABI declarations (https://dmlc.github.io/dlpack/latest/c_api.html).
//
// Why our own declarations instead of a vendored dlpack.h: the extension only
// *reads* tensors that a framework exported, so it needs the struct layouts and
// the handful of enum values below, nothing else. The layouts are fixed by the
// DLPack 1.x ABI; `static_assert`s at the bottom pin the offsets we rely on.
#pragma once

#include <cstddef>
#include <cstdint>

namespace inferops::dlpack {

struct Version {
  uint32_t major;
  uint32_t minor;
};

enum DeviceType : int32_t {
  kCPU = 1,
  kCUDA = 2,
  kCUDAHost = 3,
  kCUDAManaged = 13,
};

struct Device {
  int32_t device_type;  // DeviceType; kept as int32_t so unknown values are representable
  int32_t device_id;
};

enum TypeCode : uint8_t {
  kInt = 0,
  kUInt = 1,
  kFloat = 2,
  kOpaqueHandle = 3,
  kBfloat = 4,
  kComplex = 5,
  kBool = 6,
  // DLPack 1.1 float8 codes.
  kFloat8_e4m3fn = 10,
  kFloat8_e5m2 = 12,
};

struct DataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};

struct Tensor {
  void* data;
  Device device;
  int32_t ndim;
  DataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; nullptr means compact row-major
  uint64_t byte_offset;
};

// Legacy (unversioned) managed tensor: capsule name "dltensor".
struct ManagedTensor {
  Tensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(ManagedTensor*);
};

// DLPack >= 1.0 managed tensor: capsule name "dltensor_versioned".
struct ManagedTensorVersioned {
  Version version;
  void* manager_ctx;
  void (*deleter)(ManagedTensorVersioned*);
  uint64_t flags;
  Tensor dl_tensor;
};

constexpr uint64_t kFlagReadOnly = 1ull << 0;

constexpr const char* kCapsuleName = "dltensor";
constexpr const char* kCapsuleNameVersioned = "dltensor_versioned";
constexpr const char* kCapsuleNameUsed = "used_dltensor";
constexpr const char* kCapsuleNameUsedVersioned = "used_dltensor_versioned";

static_assert(sizeof(Device) == 8, "DLDevice ABI");
static_assert(sizeof(DataType) == 4, "DLDataType ABI");
static_assert(offsetof(Tensor, ndim) == 16 && offsetof(Tensor, shape) == 24 &&
                  offsetof(Tensor, byte_offset) == 40 && sizeof(Tensor) == 48,
              "DLTensor ABI");
static_assert(offsetof(ManagedTensorVersioned, flags) == 24 &&
                  offsetof(ManagedTensorVersioned, dl_tensor) == 32,
              "DLManagedTensorVersioned ABI");

}  // namespace inferops::dlpack
