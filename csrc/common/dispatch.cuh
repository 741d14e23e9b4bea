// Dtype dispatch for launchers (compiled by nvcc).
//
//   dispatch_float(view.dtype(), "v_a", [&](auto tag) {
//     using T = typename decltype(tag)::type;   // float, __half or __nv_bfloat16
//     launch<T>(...);
//   });
//
// The switch is closed: a dtype the op does not support throws a TypeError
// naming the argument and the dtype instead of falling through.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "tensor_view.h"

namespace inferops {

template <typename T>
struct TypeTag {
  using type = T;
};

// fp32, fp16, bf16.
template <typename F>
decltype(auto) dispatch_float(DType dtype, const char* name, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(TypeTag<float>{});
    case DType::kFloat16: return f(TypeTag<__half>{});
    case DType::kBFloat16: return f(TypeTag<__nv_bfloat16>{});
    default:
      INFEROPS_CHECK_TYPE(false, "expected dtype float32, float16 or bfloat16 for `", name,
                          "`, got ", dtype_name(dtype));
  }
}

// fp16, bf16 (tensor-core operand types).
template <typename F>
decltype(auto) dispatch_half(DType dtype, const char* name, F&& f) {
  switch (dtype) {
    case DType::kFloat16: return f(TypeTag<__half>{});
    case DType::kBFloat16: return f(TypeTag<__nv_bfloat16>{});
    default:
      INFEROPS_CHECK_TYPE(false, "expected dtype float16 or bfloat16 for `", name, "`, got ",
                          dtype_name(dtype));
  }
}

// Head dims with compiled attention kernels (the ones real models use):
//   dispatch_head_dim(d, "q", [&](auto hd) { launch<T, decltype(hd)::value>(...); });
template <typename F>
decltype(auto) dispatch_head_dim(int64_t head_dim, const char* name, F&& f) {
  switch (head_dim) {
    case 64: return f(std::integral_constant<int, 64>{});
    case 128: return f(std::integral_constant<int, 128>{});
    default:
      INFEROPS_CHECK_ARG(false, "expected head_dim 64 or 128 for `", name, "`, got ", head_dim);
  }
}

}  // namespace inferops
