// TensorView implementation; see tensor_view.h.
#include "tensor_view.h"

#include <sstream>

namespace inferops {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat8E4M3: return "float8_e4m3fn";
    case DType::kFloat8E5M2: return "float8_e5m2";
    case DType::kInt8: return "int8";
    case DType::kUInt8: return "uint8";
    case DType::kInt32: return "int32";
    case DType::kInt64: return "int64";
    case DType::kBool: return "bool";
    case DType::kUnsupported: break;
  }
  return "unsupported";
}

int dtype_size(DType t) {
  switch (t) {
    case DType::kFloat32: case DType::kInt32: return 4;
    case DType::kFloat16: case DType::kBFloat16: return 2;
    case DType::kInt64: return 8;
    case DType::kFloat8E4M3: case DType::kFloat8E5M2: case DType::kInt8: case DType::kUInt8:
    case DType::kBool: return 1;
    case DType::kUnsupported: break;
  }
  return 0;
}

DType dtype_from_dlpack(const dlpack::DataType& t) {
  if (t.lanes != 1) return DType::kUnsupported;
  switch (t.code) {
    case dlpack::kFloat:
      return t.bits == 32 ? DType::kFloat32 : t.bits == 16 ? DType::kFloat16 : DType::kUnsupported;
    case dlpack::kBfloat: return t.bits == 16 ? DType::kBFloat16 : DType::kUnsupported;
    case dlpack::kInt:
      return t.bits == 8    ? DType::kInt8
             : t.bits == 32 ? DType::kInt32
             : t.bits == 64 ? DType::kInt64
                            : DType::kUnsupported;
    case dlpack::kUInt: return t.bits == 8 ? DType::kUInt8 : DType::kUnsupported;
    case dlpack::kBool: return t.bits == 8 ? DType::kBool : DType::kUnsupported;
    case dlpack::kFloat8_e4m3fn: return t.bits == 8 ? DType::kFloat8E4M3 : DType::kUnsupported;
    case dlpack::kFloat8_e5m2: return t.bits == 8 ? DType::kFloat8E5M2 : DType::kUnsupported;
    default: return DType::kUnsupported;
  }
}

TensorView::TensorView(const dlpack::Tensor* t, bool read_only) : read_only_(read_only) {
  INFEROPS_CHECK(t != nullptr, "null DLTensor");
  INFEROPS_CHECK_ARG(t->ndim >= 0, "DLTensor has negative ndim ", t->ndim);
  dtype_ = dtype_from_dlpack(t->dtype);
  data_ = static_cast<char*>(t->data) + t->byte_offset;
  shape_.assign(t->shape, t->shape + t->ndim);
  strides_.resize(t->ndim);
  if (t->strides != nullptr) {
    strides_.assign(t->strides, t->strides + t->ndim);
  } else {  // compact row-major
    int64_t s = 1;
    for (int i = t->ndim - 1; i >= 0; --i) {
      strides_[i] = s;
      s *= shape_[i];
    }
  }
  switch (t->device.device_type) {
    case dlpack::kCPU: case dlpack::kCUDAHost: device_kind_ = DeviceKind::kCPU; break;
    case dlpack::kCUDA: device_kind_ = DeviceKind::kCUDA; break;
    default: device_kind_ = DeviceKind::kOther; break;
  }
  device_id_ = t->device.device_id;
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t s : shape_) n *= s;
  return n;
}

bool TensorView::is_contiguous() const {
  if (numel() == 0) return true;  // strides of an empty tensor are meaningless
  int64_t expected = 1;
  for (int i = ndim() - 1; i >= 0; --i) {
    if (shape_[i] != 1 && strides_[i] != expected) return false;
    expected *= shape_[i];
  }
  return true;
}

std::string TensorView::shape_str() const {
  std::ostringstream os;
  os << "[";
  for (int i = 0; i < ndim(); ++i) os << (i ? ", " : "") << shape_[i];
  os << "]";
  return os.str();
}

std::string TensorView::device_str() const {
  switch (device_kind_) {
    case DeviceKind::kCPU: return "cpu";
    case DeviceKind::kCUDA: return "cuda:" + std::to_string(device_id_);
    case DeviceKind::kOther: break;
  }
  return "unsupported device";
}

void TensorView::expect_dtype(const char* name, DType want) const {
  INFEROPS_CHECK_TYPE(dtype_ == want, "expected dtype ", dtype_name(want), " for `", name,
                      "`, got ", dtype_name(dtype_));
}

void TensorView::expect_dtype_in(const char* name, std::initializer_list<DType> allowed) const {
  for (DType d : allowed) {
    if (d == dtype_) return;
  }
  std::string list;
  for (DType d : allowed) list += (list.empty() ? "" : ", ") + std::string(dtype_name(d));
  INFEROPS_CHECK_TYPE(false, "expected dtype in {", list, "} for `", name, "`, got ",
                      dtype_name(dtype_));
}

void TensorView::expect_ndim(const char* name, int want) const {
  INFEROPS_CHECK_ARG(ndim() == want, "expected a ", want, "-d tensor for `", name,
                     "`, got shape ", shape_str());
}

void TensorView::expect_shape(const char* name, const std::vector<int64_t>& want) const {
  bool ok = static_cast<int>(want.size()) == ndim();
  for (int i = 0; ok && i < ndim(); ++i) ok = want[i] == shape_[i];
  if (ok) return;
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < want.size(); ++i) os << (i ? ", " : "") << want[i];
  os << "]";
  INFEROPS_CHECK_ARG(false, "expected shape ", os.str(), " for `", name, "`, got ", shape_str());
}

void TensorView::expect_cuda(const char* name) const {
#ifdef INFEROPS_SIMT
  // The CPU SIMT executor (inferops._simt) runs the kernels on host memory.
  INFEROPS_CHECK_ARG(device_kind_ == DeviceKind::kCPU, "expected a CPU tensor for `", name,
                     "` (the SIMT executor runs kernels on host memory), got a tensor on ", device_str());
#else
  INFEROPS_CHECK_ARG(is_cuda(), "expected a CUDA tensor for `", name, "`, got a tensor on ",
                     device_str());
#endif
}

void TensorView::expect_same_device(const char* name, const TensorView& other,
                                    const char* other_name) const {
  INFEROPS_CHECK_ARG(device_kind_ == other.device_kind_ && device_id_ == other.device_id_,
                     "expected `", name, "` on the device of `", other_name, "` (",
                     other.device_str(), "), got ", device_str());
}

void TensorView::expect_contiguous(const char* name) const {
  INFEROPS_CHECK_ARG(is_contiguous(), "expected a contiguous tensor for `", name,
                     "`, got shape ", shape_str(), " with non-compact strides");
}

void TensorView::expect_last_dim_contiguous(const char* name) const {
  INFEROPS_CHECK_ARG(ndim() == 0 || shape_.back() <= 1 || strides_.back() == 1,
                     "expected `", name, "` contiguous in its last dimension (stride 1), got stride ",
                     ndim() ? strides_.back() : 0);
}

void TensorView::expect_writable(const char* name) const {
  INFEROPS_CHECK_ARG(!read_only_, "expected a writable tensor for output `", name,
                     "`, got a read-only DLPack export");
}

}  // namespace inferops
