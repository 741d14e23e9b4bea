// CUDA error checks: every runtime call and every launch goes through these,
// so a failure surfaces as a Python RuntimeError naming the CUDA error, the
// call, the file and the line -- never as a silently wrong result.
#pragma once

#include <cuda_runtime.h>

#include "check.h"

#define INFEROPS_CUDA_CHECK(expr)                                                              \
  do {                                                                                         \
    cudaError_t inferops_err_ = (expr);                                                        \
    if (inferops_err_ != cudaSuccess) {                                                        \
      ::inferops::detail::fail<::inferops::Error>(__FILE__, __LINE__, #expr, "CUDA error ",    \
                                                  cudaGetErrorName(inferops_err_), ": ",       \
                                                  cudaGetErrorString(inferops_err_));          \
    }                                                                                          \
  } while (0)

// After a <<<...>>> launch: catches bad launch configurations immediately.
// (Asynchronous faults show up at the next synchronizing call.)
#define INFEROPS_CUDA_CHECK_LAUNCH() INFEROPS_CUDA_CHECK(cudaGetLastError())
