// CUDA error checks: every runtime call and every launch goes through these,
// so a failure surfaces as a Python RuntimeError naming the CUDA error, the
// call, the file and the line -- never as a silently wrong result.
#pragma once

#include <cuda_runtime.h>

#include "check.h"

// A failed call's error is also the runtime's "last error" until cudaGetLastError reads it:
// consume it here, where it is reported, or the next op's INFEROPS_CUDA_CHECK_LAUNCH
// (e.g. after a refused cudaLaunchKernelEx) would raise it again, blaming that op.
#define INFEROPS_CUDA_CHECK(expr)                                                              \
  do {                                                                                         \
    cudaError_t inferops_err_ = (expr);                                                        \
    if (inferops_err_ != cudaSuccess) {                                                        \
      (void)cudaGetLastError();                                                                \
      ::inferops::detail::fail<::inferops::Error>(__FILE__, __LINE__, #expr, "CUDA error ",    \
                                                  cudaGetErrorName(inferops_err_), ": ",       \
                                                  cudaGetErrorString(inferops_err_));          \
    }                                                                                          \
  } while (0)

// After a <<<...>>> launch: catches bad launch configurations immediately.
// (Asynchronous faults show up at the next synchronizing call.)
#define INFEROPS_CUDA_CHECK_LAUNCH() INFEROPS_CUDA_CHECK(cudaGetLastError())
