#pragma once
// What every primitive of the CUDA backend runs on: one device, its stream
// and cuBLAS handle, and the backend's own scratch (CUB temp storage, sort
// keys, bf16 copies of GEMM operands, the grouped GEMM's arrays). Shared by
// the copies of a backend (the layer keeps one). The primitives that use the
// scratch hold `mutex` until their results are complete, so several host
// threads may drive one backend; their kernels share the stream.

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <mutex>
#include <vector>

#include "moe/backend/cuda/check.cuh"
#include "moe/backend/cuda/memory.cuh"
#include "moe/core/config.hpp"
#include "moe/core/error.hpp"

namespace moe::cuda {

// Number of CUDA devices this process can use: 0 where there is no GPU or no
// driver; any other failure of cudaGetDeviceCount throws.
inline int device_count() {
  int n = 0;
  const cudaError_t status = cudaGetDeviceCount(&n);
  if (status == cudaErrorNoDevice || status == cudaErrorInsufficientDriver) {
    cudaGetLastError();  // clear the error
    return 0;
  }
  detail::check(status, "cudaGetDeviceCount");
  return n;
}

namespace detail {

// One expert's product, row-major C = op(A) op(B) + beta C, with A and B
// at offsets (in elements) into the operands.
struct GemmProblem {
  bool trans_a, trans_b;
  Index m, n, k;
  Index a_offset, lda, b_offset, ldb;
  float* c;
  Index ldc;
};

// Host arrays of a grouped cuBLAS call (one entry per group).
struct GroupedArrays {
  std::vector<cublasOperation_t> trans_a, trans_b;
  std::vector<int> m, n, k, lda, ldb, ldc, group_size;
  std::vector<float> alpha, beta;
  std::vector<const void*> pointers;
  void clear() {
    for (auto* v : {&m, &n, &k, &lda, &ldb, &ldc, &group_size}) v->clear();
    trans_a.clear();
    trans_b.clear();
    alpha.clear();
    beta.clear();
  }
};

constexpr int kBlock = 256;  // threads per block of the loop kernels

struct Context {
  explicit Context(int dev) : device(dev) {
    const int n = device_count();
    moe::detail::require(n > 0, "moe::cuda::Backend: device=", dev,
                         ", but no CUDA device is available (cudaGetDeviceCount found none)");
    moe::detail::require(dev >= 0 && dev < n, "moe::cuda::Backend: device=", dev,
                         ", expected 0 <= device < ", n, " (the CUDA devices found)");
    check(cudaSetDevice(dev), "cudaSetDevice");
    check(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, dev),
          "cudaDeviceGetAttribute (multiprocessors)");
    check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    try {
      check(cublasCreate(&blas), "cublasCreate");
      check(cublasSetStream(blas, stream), "cublasSetStream");
    } catch (...) {
      if (blas != nullptr) cublasDestroy(blas);
      cudaStreamDestroy(stream);
      throw;
    }
  }
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;
  ~Context() {
    cublasDestroy(blas);
    cudaStreamDestroy(stream);
  }

  void activate() const { check(cudaSetDevice(device), "cudaSetDevice"); }
  void synchronize(const char* what) const { check(cudaStreamSynchronize(stream), what); }
  // The largest grid (in blocks) a loop launches; kernels grid-stride beyond.
  Index max_blocks() const { return Index{32} * multiprocessors; }
  // Blocks of kBlock threads for n threads' work, at most max_blocks().
  unsigned blocks(Index n) const {
    return static_cast<unsigned>(std::min((n + kBlock - 1) / kBlock, max_blocks()));
  }

  int device = 0;
  int multiprocessors = 1;
  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
  std::mutex mutex;        // held by the primitives below while they use them
  DeviceScratch scratch;   // CUB temp storage, sort keys, flags
  DeviceScratch operands;  // bf16 copies of grouped GEMM operands
  // The grouped GEMMs' problems and, for the grouped cuBLAS call, its
  // per-group arrays (host) and pointer arrays (device): reused per call.
  std::vector<GemmProblem> problems;
  GroupedArrays grouped;
  DeviceScratch pointers;
};

// n values from device or managed memory to the host, on the stream.
template <class U>
void copy_to_host(const Context& context, U* dst, const U* src, Index n) {
  if (n <= 0) return;
  check(cudaMemcpyAsync(dst, src, static_cast<std::size_t>(n) * sizeof(U), cudaMemcpyDefault,
                        context.stream),
        "cudaMemcpyAsync (to host)");
  context.synchronize("cudaStreamSynchronize (copy_to_host)");
}

}  // namespace detail
}  // namespace moe::cuda
