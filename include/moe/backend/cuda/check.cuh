#pragma once
// Every CUDA runtime and cuBLAS call of the backend goes through check(), which
// turns a failure into moe::Error naming the call and the status.

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "moe/core/error.hpp"

namespace moe::cuda::detail {

inline void check(cudaError_t status, const char* call) {
  if (status == cudaSuccess) return;
  throw Error(moe::detail::concat("moe::cuda: ", call, " failed: ", cudaGetErrorName(status), " (",
                                  cudaGetErrorString(status), ")"));
}

inline void check(cublasStatus_t status, const char* call) {
  if (status == CUBLAS_STATUS_SUCCESS) return;
  throw Error(moe::detail::concat("moe::cuda: ", call, " failed: ", cublasGetStatusName(status),
                                  " (", cublasGetStatusString(status), ")"));
}

// A kernel launch reports bad launch parameters at once and faults when the
// stream is synchronised: both are checked, naming the kernel.
inline void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

}  // namespace moe::cuda::detail
