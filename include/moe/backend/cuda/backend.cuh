#pragma once
// moe::cuda::Backend<T>: the layer on an NVIDIA GPU (needs nvcc with
// --extended-lambda; link moe::cuda). T is the type of the expert GEMMs'
// operands: float, or __nv_bfloat16 with fp32 accumulation. The router, the
// gates, the activations and every parameter, gradient and state buffer stay
// fp32 (Scalar = float), as in mixed-precision training.
//
// The same primitives as moe::cpu::Backend, so the same layer and policies run
// unchanged and every per-token formula is the moe::math function the CPU
// tests check:
// - parallel_for(n, f): one kernel, f(i) per index (f is a __host__ __device__
//   lambda of the layer or a policy);
// - gemm: cuBLAS (fp32, the router's products);
// - parallel_for_rows(rows, cols, f): one thread per column of a row, so a
//   warp touches neighbouring values (the layer's gathers, activations and
//   combines); parallel_sum_rows: one warp per sum (dot products);
// - grouped_gemm / grouped_gemm_tn: fp32 in one cublasGemmGroupedBatchedEx
//   call (cuBLAS 12.5+; one cublasSgemm per expert before), bf16 one
//   cublasGemmEx per expert on bf16 copies of the operands (only the weights
//   of experts with rows are converted) with fp32 accumulation;
// - dispatch: CUB radix sort of the pairs by expert (end_bit = ceil(log2 E),
//   stable, so token order inside an expert), histogram, exclusive scans, and
//   one kernel that applies the capacity and writes the permutation.
// The layers below: context.cuh (device, stream, handle, scratch),
// kernels.cuh, expert_gemm.cuh and dispatch.cuh.
//
// Synchronisation: every primitive returns with its results visible to the
// host (BackendPolicy's contract: the layer reads expert counts and loss
// terms there). The data that crosses to the host per forward: the per-expert
// counts and offsets (2E + 1 values, for the GEMM launches), the ReLU router's
// pair count, and the routers' E loss terms (T log-sum-exps with a z-loss).

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cub/device/device_scan.cuh>
#include <memory>
#include <memory_resource>
#include <mutex>
#include <type_traits>
#include <vector>

#include "moe/backend/cuda/check.cuh"
#include "moe/backend/cuda/context.cuh"
#include "moe/backend/cuda/dispatch.cuh"
#include "moe/backend/cuda/expert_gemm.cuh"
#include "moe/backend/cuda/kernels.cuh"
#include "moe/backend/cuda/memory.cuh"
#include "moe/core/concepts.hpp"
#include "moe/core/error.hpp"
#include "moe/core/routing.hpp"

namespace moe::cuda {

template <class T>
class Backend {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, __nv_bfloat16>,
                "moe::cuda::Backend<T>: T is float or __nv_bfloat16 (the expert GEMMs' operands)");

 public:
  using Scalar = float;     // router, gates, activations, parameters: fp32
  using ExpertOperand = T;  // what the expert GEMMs multiply
  // A class template, not an alias of ManagedBuffer: nvcc's front end does not
  // treat an alias template as the same template template argument everywhere.
  template <class U>
  class Buffer : public ManagedBuffer<U> {};
  static constexpr const char* kName = std::is_same_v<T, float> ? "cuda" : "cuda_bf16";

  // Runs on `device`; throws moe::Error when there is no such device.
  explicit Backend(int device = 0) : context_(std::make_shared<detail::Context>(device)) {}

  int device() const { return context_->device; }
  // The device's multiprocessors: the width of its parallel loops.
  int threads() const { return context_->multiprocessors; }
  std::pmr::memory_resource* memory_resource() const { return managed_memory(); }

  template <class U>
  void copy_to_host(U* dst, const U* src, Index n) const {
    context_->activate();
    detail::copy_to_host(*context_, dst, src, n);
  }

  // f(i) for every i in [0, n) in one kernel; `work` is the CPU backend's hint
  // for its threading and is not needed here.
  template <class F>
  void parallel_for(Index n, F&& f, Index /*work*/ = 0) const {
    if (n <= 0) return;
    context_->activate();
    kernels::for_each_index<<<context_->blocks(n), detail::kBlock, 0, stream()>>>(n, f);
    detail::check_launch("moe::cuda::kernels::for_each_index");
    context_->synchronize("cudaStreamSynchronize (parallel_for)");
  }

  // f(r, c, c + 1) for every row r < rows and column c < cols: one column per
  // thread, neighbouring threads on neighbouring columns of a row.
  template <class F>
  void parallel_for_rows(Index rows, Index cols, F&& f, Index /*work*/ = 0) const {
    if (rows <= 0 || cols <= 0) return;
    context_->activate();
    // Block: a warp multiple along the columns (up to kBlock), rows fill the rest.
    const Index width = std::min<Index>(detail::kBlock, (cols + 31) / 32 * 32);
    const dim3 block(static_cast<unsigned>(width), static_cast<unsigned>(detail::kBlock / width));
    const Index column_blocks = (cols + width - 1) / width;
    const Index row_blocks = (rows + block.y - 1) / block.y;
    const Index max_blocks = context_->max_blocks();
    const Index gx = std::min(column_blocks, max_blocks);
    const Index gy = std::min({row_blocks, std::max<Index>(max_blocks / gx, 1), Index{65535}});
    kernels::for_each_row_column<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)),
                                   block, 0, stream()>>>(rows, cols, f);
    detail::check_launch("moe::cuda::kernels::for_each_row_column");
    context_->synchronize("cudaStreamSynchronize (parallel_for_rows)");
  }

  // store(i, sum over j < len of term(i, j)) for every i < n: one warp per i
  // (the terms added in a tree, not in order of j).
  template <class Term, class Store>
  void parallel_sum_rows(Index n, Index len, Term&& term, Store&& store, Index /*work*/ = 0) const {
    if (n <= 0) return;
    context_->activate();
    // One warp (32 threads) per item.
    kernels::sum_rows<<<context_->blocks(n * 32), detail::kBlock, 0, stream()>>>(n, len, term,
                                                                                 store);
    detail::check_launch("moe::cuda::kernels::sum_rows");
    context_->synchronize("cudaStreamSynchronize (parallel_sum_rows)");
  }

  // Row-major C (m, n) = alpha op(A) op(B) + beta C, fp32 (router products).
  void gemm(bool trans_a, bool trans_b, Index m, Index n, Index k, float alpha, const float* a,
            Index lda, const float* b, Index ldb, float beta, float* c, Index ldc) const {
    if (m == 0 || n == 0) return;
    if (k == 0) {  // C = beta C, and 0 (not 0 * C) for beta = 0, as the CPU backend
      parallel_for_rows(m, n, [=] MOE_HOST_DEVICE(Index r, Index begin, Index end) {
        for (Index j = begin; j < end; ++j)
          c[r * ldc + j] = beta == 0 ? 0.0f : beta * c[r * ldc + j];
      });
      return;
    }
    context_->activate();
    detail::sgemm(*context_, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    context_->synchronize("cudaStreamSynchronize (gemm)");
  }

  void gemm_rows(bool trans_b, Index m, Index n, Index k, float alpha, const float* a, Index lda,
                 const float* b, Index ldb, float beta, float* c, Index ldc) const {
    gemm(false, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }

  // For every expert e owning rows [offsets[e], offsets[e+1]):
  //   C_e (n_e, n) = A_e (n_e, k) op(B_e) + beta C_e,  B_e = b + e * b_stride,
  // op(B_e) of shape (k, n): B_e stored (k, n), or (n, k) when trans_b.
  void grouped_gemm(const std::vector<Index>& offsets, bool trans_b, Index n, Index k,
                    const float* a, const float* b, Index b_stride, float beta, float* c) const {
    const Index E = static_cast<Index>(offsets.size()) - 1, rows = offsets.back();
    if (rows == 0 || n == 0) return;
    const std::lock_guard<std::mutex> lock(context_->mutex);
    context_->activate();
    const auto ops = detail::expert_operands<T>(*context_, offsets, a, rows * k, b, b_stride);
    auto& problems = context_->problems;
    problems.clear();
    for (Index e = 0; e < E; ++e) {
      const Index r0 = offsets[e], ne = offsets[e + 1] - r0;
      if (ne == 0) continue;
      problems.push_back(
          {false, trans_b, ne, n, k, r0 * k, k, e * b_stride, trans_b ? k : n, c + r0 * n, n});
    }
    detail::run_expert_gemms<T>(*context_, ops, beta);
    context_->synchronize("cudaStreamSynchronize (grouped_gemm)");
  }

  // For every expert e: W_e (k, n) += A_e^T (k, n_e) B_e (n_e, n), W_e = w + e * w_stride.
  void grouped_gemm_tn(const std::vector<Index>& offsets, Index k, Index n, const float* a,
                       const float* b, float* w, Index w_stride) const {
    const Index E = static_cast<Index>(offsets.size()) - 1, rows = offsets.back();
    if (rows == 0 || n == 0 || k == 0) return;
    const std::lock_guard<std::mutex> lock(context_->mutex);
    context_->activate();
    const auto ops = detail::operands<T>(*context_, a, rows * k, b, rows * n);
    auto& problems = context_->problems;
    problems.clear();
    for (Index e = 0; e < E; ++e) {
      const Index r0 = offsets[e], ne = offsets[e + 1] - r0;
      if (ne == 0) continue;
      problems.push_back({true, false, k, n, ne, r0 * k, k, r0 * n, n, w + e * w_stride, n});
    }
    detail::run_expert_gemms<T>(*context_, ops, 1.0f);
    context_->synchronize("cudaStreamSynchronize (grouped_gemm_tn)");
  }

  // offsets[0] = 0, offsets[i + 1] = offsets[i] + counts[i]; returns the total
  // (read back: the caller sizes the next buffers with it).
  Index offsets_from_counts(const Index* counts, Index n, Index* offsets) const {
    moe::detail::require(n >= 0 && n <= Index{INT_MAX},
                         "moe::cuda::Backend::offsets_from_counts: n=", n,
                         ", expected 0 <= n <= INT_MAX (CUB's item count)");
    const std::lock_guard<std::mutex> lock(context_->mutex);
    context_->activate();
    detail::check(cudaMemsetAsync(offsets, 0, sizeof(Index), stream()), "cudaMemsetAsync");
    if (n > 0) {
      std::size_t temp_bytes = 0;
      detail::check(cub::DeviceScan::InclusiveSum(nullptr, temp_bytes, counts, offsets + 1,
                                                  static_cast<int>(n), stream()),
                    "cub::DeviceScan::InclusiveSum (size)");
      void* temp = context_->scratch.reserve(temp_bytes);
      detail::check(cub::DeviceScan::InclusiveSum(temp, temp_bytes, counts, offsets + 1,
                                                  static_cast<int>(n), stream()),
                    "cub::DeviceScan::InclusiveSum");
    }
    Index total = 0;
    detail::copy_to_host(*context_, &total, offsets + n, 1);
    return total;
  }

  // Index of the first NaN or Inf in p[0, n), or -1.
  template <class S>
  Index first_non_finite(const S* p, Index n) const {
    if (n <= 0) return -1;
    const std::lock_guard<std::mutex> lock(context_->mutex);
    context_->activate();
    auto* first = static_cast<unsigned long long*>(context_->scratch.reserve(sizeof(long long)));
    const unsigned long long none = ~0ull;
    detail::check(cudaMemcpyAsync(first, &none, sizeof none, cudaMemcpyHostToDevice, stream()),
                  "cudaMemcpyAsync (first_non_finite)");
    kernels::first_non_finite<<<context_->blocks(n), detail::kBlock, 0, stream()>>>(p, n, first);
    detail::check_launch("moe::cuda::kernels::first_non_finite");
    unsigned long long found = none;
    detail::copy_to_host(*context_, &found, first, 1);
    return found == none ? -1 : static_cast<Index>(found);
  }

  // The pairs sorted by expert (stable: token order inside an expert), at most
  // `capacity` per expert (capacity < 0: all); the same result as the CPU
  // backend's counting sort (see dispatch.cuh).
  template <class S>
  void dispatch(const Selection<S, Buffer>& sel, Index capacity, Dispatch<Buffer>& out) const {
    const std::lock_guard<std::mutex> lock(context_->mutex);
    detail::dispatch_pairs(*context_, sel, capacity, out);
  }

 private:
  cudaStream_t stream() const { return context_->stream; }

  std::shared_ptr<detail::Context> context_;
};

static_assert(BackendPolicy<Backend<float>>);
static_assert(BackendPolicy<Backend<__nv_bfloat16>>);

}  // namespace moe::cuda
