// TensorView: a non-owning view of a tensor exported through DLPack.
//
// The extension links no libtorch, so tensors arrive as DLPack capsules (see
// csrc/bindings.cpp). A TensorView borrows the DLTensor for the duration of one
// call: the capsule (and so the producer's storage) outlives the view because
// the Python caller holds it. Shapes and strides are in elements, 64-bit.
//
// Checks throw inferops::ValueError / TypeError naming the argument, so every
// launcher validates its inputs the same way, e.g.
//   v.expect_dtype_in("v_a", {DType::kFloat16, DType::kBFloat16, DType::kFloat32});
//   v.expect_ndim("v_a", 3);
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "check.h"
#include "dlpack_abi.h"

namespace inferops {

enum class DType : int {
  kFloat32,
  kFloat16,
  kBFloat16,
  kFloat8E4M3,
  kFloat8E5M2,
  kInt8,
  kUInt8,
  kInt32,
  kInt64,
  kBool,
  kUnsupported,
};

const char* dtype_name(DType t);
int dtype_size(DType t);  // bytes per element; 0 for kUnsupported
DType dtype_from_dlpack(const dlpack::DataType& t);

enum class DeviceKind : int { kCPU, kCUDA, kOther };

class TensorView {
 public:
  TensorView() = default;
  // `read_only` comes from the versioned DLPack flags; outputs must not be read-only.
  TensorView(const dlpack::Tensor* t, bool read_only);

  void* data() const { return data_; }
  template <typename T>
  T* data_as() const {
    return static_cast<T*>(data_);
  }
  DType dtype() const { return dtype_; }
  int element_size() const { return dtype_size(dtype_); }
  int ndim() const { return static_cast<int>(shape_.size()); }
  int64_t size(int dim) const { return shape_.at(wrap(dim)); }
  int64_t stride(int dim) const { return strides_.at(wrap(dim)); }
  const std::vector<int64_t>& sizes() const { return shape_; }
  const std::vector<int64_t>& strides() const { return strides_; }
  int64_t numel() const;
  DeviceKind device_kind() const { return device_kind_; }
  int device_id() const { return device_id_; }
  bool is_cuda() const { return device_kind_ == DeviceKind::kCUDA; }
  bool read_only() const { return read_only_; }
  bool is_contiguous() const;
  std::string shape_str() const;
  std::string device_str() const;

  // Argument checks; `name` is the Python-visible argument name.
  void expect_dtype(const char* name, DType want) const;
  void expect_dtype_in(const char* name, std::initializer_list<DType> allowed) const;
  void expect_ndim(const char* name, int want) const;
  void expect_shape(const char* name, const std::vector<int64_t>& want) const;
  void expect_cuda(const char* name) const;
  void expect_same_device(const char* name, const TensorView& other, const char* other_name) const;
  void expect_contiguous(const char* name) const;
  void expect_last_dim_contiguous(const char* name) const;
  void expect_writable(const char* name) const;

 private:
  int wrap(int dim) const { return dim < 0 ? dim + ndim() : dim; }

  void* data_ = nullptr;
  DType dtype_ = DType::kUnsupported;
  std::vector<int64_t> shape_;
  std::vector<int64_t> strides_;
  DeviceKind device_kind_ = DeviceKind::kOther;
  int device_id_ = 0;
  bool read_only_ = false;
};

}  // namespace inferops
