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
#include <cstdint>
#include <cub/device/device_histogram.cuh>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>
#include <memory>
#include <memory_resource>
#include <type_traits>
#include <vector>

#include "moe/backend/cuda/check.cuh"
#include "moe/backend/cuda/memory.cuh"
#include "moe/core/concepts.hpp"
#include "moe/core/error.hpp"
#include "moe/core/routing.hpp"

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

namespace kernels {

// Kernels are templates (on their element types): a header's non-template
// __global__ function would be defined again in every .cu file including it.

constexpr int kBlock = 256;

template <class F>
__global__ void for_each_index(Index n, F f) {
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index i = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    f(i);
}

// f(r, c, c + 1) for every (r, c): threadIdx.x runs along a row's columns, so
// a warp reads and writes neighbouring values of one row (coalesced), and
// threadIdx.y takes one row each. Grid-stride in both directions.
template <class F>
__global__ void for_each_row_column(Index rows, Index cols, F f) {
  const Index column_stride = static_cast<Index>(gridDim.x) * blockDim.x;
  const Index row_stride = static_cast<Index>(gridDim.y) * blockDim.y;
  for (Index r = static_cast<Index>(blockIdx.y) * blockDim.y + threadIdx.y; r < rows;
       r += row_stride)
    for (Index c = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; c < cols;
         c += column_stride)
      f(r, c, c + 1);
}

// store(i, sum_j term(i, j)): one warp per i, its lanes striding over j, then
// a shuffle tree. Every lane of a warp runs the same i (the loop bound is
// uniform per warp), so the full mask is right.
template <class Term, class Store>
__global__ void sum_rows(Index n, Index len, Term term, Store store) {
  using Sum = std::decay_t<decltype(term(Index{}, Index{}))>;
  constexpr int kWarp = 32;
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const Index warps = static_cast<Index>(gridDim.x) * (blockDim.x / kWarp);
  for (Index i = (static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp; i < n;
       i += warps) {
    Sum sum = 0;
    for (Index j = lane; j < len; j += kWarp) sum += term(i, j);
    for (int offset = kWarp / 2; offset > 0; offset /= 2)
      sum += __shfl_down_sync(0xffffffffu, sum, offset);
    if (lane == 0) store(i, sum);
  }
}

// The smallest i with a NaN or Inf (v - v is 0 for every finite v only).
template <class S>
__global__ void first_non_finite(const S* p, Index n, unsigned long long* first) {
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index i = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    if (!(p[i] - p[i] == S(0))) atomicMin(first, static_cast<unsigned long long>(i));
}

template <class To>
__global__ void convert(const float* src, Index n, To* dst) {
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index i = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    dst[i] = static_cast<To>(src[i]);
}

// pair_token[p] = t for the pairs of token t; pair_index[p] = p (sort values).
template <class I>
__global__ void pair_tokens(const I* token_offsets, I tokens, I* pair_token, I* pair_index) {
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index t = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; t < tokens; t += stride)
    for (Index p = token_offsets[t]; p < token_offsets[t + 1]; ++p) {
      pair_token[p] = t;
      pair_index[p] = p;
    }
}

// Pairs each expert keeps: all, or its first `capacity` in token order.
template <class I>
__global__ void kept_counts(const int* counts, I experts, I capacity, I* kept) {
  const I stride = static_cast<I>(gridDim.x) * blockDim.x;
  for (I e = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; e < experts; e += stride) {
    const I n = counts[e];
    kept[e] = capacity < 0 || n < capacity ? n : capacity;
  }
}

// From the pairs sorted by expert: the rank of each pair inside its expert
// decides whether it is kept, and then its row.
template <class I>
__global__ void place_pairs(const int* sorted_expert, const I* sorted_pair, I pairs,
                            const I* sorted_start, const I* kept, const I* row_offsets,
                            const I* pair_token, I* pair_row, I* row_pair, int* row_expert,
                            I* row_token) {
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index s = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; s < pairs;
       s += stride) {
    const int e = sorted_expert[s];
    const Index p = sorted_pair[s];
    const Index rank = s - sorted_start[e];
    if (rank < kept[e]) {
      const Index row = row_offsets[e] + rank;
      pair_row[p] = row;
      row_pair[row] = p;
      row_expert[row] = e;
      row_token[row] = pair_token[p];
    } else {
      pair_row[p] = -1;
    }
  }
}

}  // namespace kernels

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
  explicit Backend(int device = 0) : context_(std::make_shared<Context>(device)) {}

  int device() const { return context_->device; }
  // The device's multiprocessors: the width of its parallel loops.
  int threads() const { return context_->multiprocessors; }
  std::pmr::memory_resource* memory_resource() const { return managed_memory(); }

  template <class U>
  void copy_to_host(U* dst, const U* src, Index n) const {
    if (n <= 0) return;
    activate();
    detail::check(cudaMemcpyAsync(dst, src, static_cast<std::size_t>(n) * sizeof(U),
                                  cudaMemcpyDefault, stream()),
                  "cudaMemcpyAsync (to host)");
    synchronize("cudaStreamSynchronize (copy_to_host)");
  }

  // f(i) for every i in [0, n) in one kernel; `work` is the CPU backend's hint
  // for its threading and is not needed here.
  template <class F>
  void parallel_for(Index n, F&& f, Index /*work*/ = 0) const {
    if (n <= 0) return;
    activate();
    kernels::for_each_index<<<blocks(n), kernels::kBlock, 0, stream()>>>(n, f);
    detail::check_launch("moe::cuda::kernels::for_each_index");
    synchronize("cudaStreamSynchronize (parallel_for)");
  }

  // f(r, c, c + 1) for every row r < rows and column c < cols: one column per
  // thread, neighbouring threads on neighbouring columns of a row.
  template <class F>
  void parallel_for_rows(Index rows, Index cols, F&& f, Index /*work*/ = 0) const {
    if (rows <= 0 || cols <= 0) return;
    activate();
    // Block: a warp multiple along the columns (up to kBlock), rows fill the rest.
    const Index width = std::min<Index>(kernels::kBlock, (cols + 31) / 32 * 32);
    const dim3 block(static_cast<unsigned>(width), static_cast<unsigned>(kernels::kBlock / width));
    const Index column_blocks = (cols + width - 1) / width;
    const Index row_blocks = (rows + block.y - 1) / block.y;
    const Index gx = std::min(column_blocks, max_blocks());
    const Index gy = std::min({row_blocks, std::max<Index>(max_blocks() / gx, 1), Index{65535}});
    kernels::for_each_row_column<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)),
                                   block, 0, stream()>>>(rows, cols, f);
    detail::check_launch("moe::cuda::kernels::for_each_row_column");
    synchronize("cudaStreamSynchronize (parallel_for_rows)");
  }

  // store(i, sum over j < len of term(i, j)) for every i < n: one warp per i
  // (the terms added in a tree, not in order of j).
  template <class Term, class Store>
  void parallel_sum_rows(Index n, Index len, Term&& term, Store&& store, Index /*work*/ = 0) const {
    if (n <= 0) return;
    activate();
    // One warp (32 threads) per item.
    kernels::sum_rows<<<blocks(n * 32), kernels::kBlock, 0, stream()>>>(n, len, term, store);
    detail::check_launch("moe::cuda::kernels::sum_rows");
    synchronize("cudaStreamSynchronize (parallel_sum_rows)");
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
    activate();
    sgemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    synchronize("cudaStreamSynchronize (gemm)");
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
    activate();
    const Operands ops = expert_operands(offsets, a, rows * k, b, b_stride);
    std::vector<Problem>& problems = context_->problems;
    problems.clear();
    for (Index e = 0; e < E; ++e) {
      const Index r0 = offsets[e], ne = offsets[e + 1] - r0;
      if (ne == 0) continue;
      problems.push_back(
          {false, trans_b, ne, n, k, r0 * k, k, e * b_stride, trans_b ? k : n, c + r0 * n, n});
    }
    run(problems, ops, beta);
    synchronize("cudaStreamSynchronize (grouped_gemm)");
  }

  // For every expert e: W_e (k, n) += A_e^T (k, n_e) B_e (n_e, n), W_e = w + e * w_stride.
  void grouped_gemm_tn(const std::vector<Index>& offsets, Index k, Index n, const float* a,
                       const float* b, float* w, Index w_stride) const {
    const Index E = static_cast<Index>(offsets.size()) - 1, rows = offsets.back();
    if (rows == 0 || n == 0 || k == 0) return;
    activate();
    const Operands ops = operands(a, rows * k, b, rows * n);
    std::vector<Problem>& problems = context_->problems;
    problems.clear();
    for (Index e = 0; e < E; ++e) {
      const Index r0 = offsets[e], ne = offsets[e + 1] - r0;
      if (ne == 0) continue;
      problems.push_back({true, false, k, n, ne, r0 * k, k, r0 * n, n, w + e * w_stride, n});
    }
    run(problems, ops, 1.0f);
    synchronize("cudaStreamSynchronize (grouped_gemm_tn)");
  }

  // offsets[0] = 0, offsets[i + 1] = offsets[i] + counts[i]; returns the total
  // (read back: the caller sizes the next buffers with it).
  Index offsets_from_counts(const Index* counts, Index n, Index* offsets) const {
    moe::detail::require(n >= 0 && n <= Index{INT_MAX},
                         "moe::cuda::Backend::offsets_from_counts: n=", n,
                         ", expected 0 <= n <= INT_MAX (CUB's item count)");
    activate();
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
    copy_to_host(&total, offsets + n, 1);
    return total;
  }

  // Index of the first NaN or Inf in p[0, n), or -1.
  template <class S>
  Index first_non_finite(const S* p, Index n) const {
    if (n <= 0) return -1;
    activate();
    auto* first = static_cast<unsigned long long*>(context_->scratch.reserve(sizeof(long long)));
    const unsigned long long none = ~0ull;
    detail::check(cudaMemcpyAsync(first, &none, sizeof none, cudaMemcpyHostToDevice, stream()),
                  "cudaMemcpyAsync (first_non_finite)");
    kernels::first_non_finite<<<blocks(n), kernels::kBlock, 0, stream()>>>(p, n, first);
    detail::check_launch("moe::cuda::kernels::first_non_finite");
    unsigned long long found = none;
    copy_to_host(&found, first, 1);
    return found == none ? -1 : static_cast<Index>(found);
  }

  // The pairs sorted by expert (stable: token order inside an expert), at most
  // `capacity` per expert (capacity < 0: all); the same result as the CPU
  // backend's counting sort.
  template <class S>
  void dispatch(const Selection<S, Buffer>& sel, Index capacity, Dispatch<Buffer>& out) const {
    const Index E = sel.experts, P = sel.pairs(), tokens = sel.tokens;
    moe::detail::require(P <= Index{INT_MAX}, "moe::cuda::Backend::dispatch: ", P,
                         " pairs, expected at most INT_MAX (CUB's item count)");
    moe::detail::require(E >= 1 && E <= Index{INT_MAX}, "moe::cuda::Backend::dispatch: experts=", E,
                         ", expected 1 <= experts <= INT_MAX");
    activate();
    out.pair_token.resize(static_cast<std::size_t>(P));
    out.pair_row.resize(static_cast<std::size_t>(P));
    out.row_offsets.resize(static_cast<std::size_t>(E + 1));

    ScratchPlan plan;
    const auto pair_index_at = plan.add<Index>(P), sorted_pair_at = plan.add<Index>(P);
    const auto sorted_expert_at = plan.add<int>(P), counts_at = plan.add<int>(E);
    const auto start_at = plan.add<Index>(E), kept_at = plan.add<Index>(E);
    const auto widened_at = plan.add<Index>(E);
    int end_bit = 1;  // ceil(log2 E), at least one bit
    while ((Index{1} << end_bit) < E) ++end_bit;
    std::size_t sort_bytes = 0, histogram_bytes = 0, scan_bytes = 0;
    const int* keys = sel.pair_expert.data();
    detail::check(cub::DeviceRadixSort::SortPairs(
                      nullptr, sort_bytes, keys, static_cast<int*>(nullptr),
                      static_cast<const Index*>(nullptr), static_cast<Index*>(nullptr),
                      static_cast<int>(P), 0, end_bit, stream()),
                  "cub::DeviceRadixSort::SortPairs (size)");
    detail::check(
        cub::DeviceHistogram::HistogramEven(nullptr, histogram_bytes, keys,
                                            static_cast<int*>(nullptr), static_cast<int>(E + 1), 0,
                                            static_cast<int>(E), static_cast<int>(P), stream()),
        "cub::DeviceHistogram::HistogramEven (size)");
    detail::check(
        cub::DeviceScan::ExclusiveSum(nullptr, scan_bytes, static_cast<Index*>(nullptr),
                                      static_cast<Index*>(nullptr), static_cast<int>(E), stream()),
        "cub::DeviceScan::ExclusiveSum (size)");
    const std::size_t temp_bytes = std::max({sort_bytes, histogram_bytes, scan_bytes});
    const auto temp_at = plan.add<char>(temp_bytes);
    void* base = context_->scratch.reserve(plan.bytes());
    auto* pair_index = ScratchPlan::at<Index>(base, pair_index_at);
    auto* sorted_pair = ScratchPlan::at<Index>(base, sorted_pair_at);
    auto* sorted_expert = ScratchPlan::at<int>(base, sorted_expert_at);
    auto* counts = ScratchPlan::at<int>(base, counts_at);
    auto* sorted_start = ScratchPlan::at<Index>(base, start_at);
    auto* kept = ScratchPlan::at<Index>(base, kept_at);
    auto* widened = ScratchPlan::at<Index>(base, widened_at);
    void* temp = ScratchPlan::at<char>(base, temp_at);

    if (tokens > 0) {
      kernels::pair_tokens<<<blocks(tokens), kernels::kBlock, 0, stream()>>>(
          sel.token_offsets.data(), tokens, out.pair_token.data(), pair_index);
      detail::check_launch("moe::cuda::kernels::pair_tokens");
    }
    if (P > 0) {
      detail::check(
          cub::DeviceRadixSort::SortPairs(temp, sort_bytes, keys, sorted_expert, pair_index,
                                          sorted_pair, static_cast<int>(P), 0, end_bit, stream()),
          "cub::DeviceRadixSort::SortPairs");
    }
    detail::check(cub::DeviceHistogram::HistogramEven(
                      temp, histogram_bytes, keys, counts, static_cast<int>(E + 1), 0,
                      static_cast<int>(E), static_cast<int>(P), stream()),
                  "cub::DeviceHistogram::HistogramEven");
    // Where each expert's pairs start in sorted order, and the rows it keeps.
    kernels::kept_counts<<<blocks(E), kernels::kBlock, 0, stream()>>>(counts, E, Index{-1},
                                                                      widened);
    detail::check_launch("moe::cuda::kernels::kept_counts");
    detail::check(cub::DeviceScan::ExclusiveSum(temp, scan_bytes, widened, sorted_start,
                                                static_cast<int>(E), stream()),
                  "cub::DeviceScan::ExclusiveSum (sorted starts)");
    kernels::kept_counts<<<blocks(E), kernels::kBlock, 0, stream()>>>(counts, E, capacity, kept);
    detail::check_launch("moe::cuda::kernels::kept_counts");
    detail::check(cudaMemsetAsync(out.row_offsets.data(), 0, sizeof(Index), stream()),
                  "cudaMemsetAsync");
    std::size_t inclusive_bytes = 0;
    detail::check(
        cub::DeviceScan::InclusiveSum(nullptr, inclusive_bytes, kept, out.row_offsets.data() + 1,
                                      static_cast<int>(E), stream()),
        "cub::DeviceScan::InclusiveSum (size)");
    moe::detail::require(inclusive_bytes <= temp_bytes, "moe::cuda::Backend::dispatch: CUB asks ",
                         inclusive_bytes, " bytes for a scan, expected at most ", temp_bytes);
    detail::check(
        cub::DeviceScan::InclusiveSum(temp, inclusive_bytes, kept, out.row_offsets.data() + 1,
                                      static_cast<int>(E), stream()),
        "cub::DeviceScan::InclusiveSum (row offsets)");

    // The host copies the GEMM launches need (the documented round trip).
    out.selected_per_expert.resize(static_cast<std::size_t>(E));
    out.rows_per_expert.resize(static_cast<std::size_t>(E));
    out.expert_offsets.resize(static_cast<std::size_t>(E + 1));
    copy_to_host(out.selected_per_expert.data(), widened, E);
    copy_to_host(out.rows_per_expert.data(), kept, E);
    copy_to_host(out.expert_offsets.data(), out.row_offsets.data(), E + 1);
    const Index rows = out.expert_offsets[static_cast<std::size_t>(E)];
    out.dropped = P - rows;

    out.row_pair.resize(static_cast<std::size_t>(rows));
    out.row_expert.resize(static_cast<std::size_t>(rows));
    out.row_token.resize(static_cast<std::size_t>(rows));
    if (P > 0) {
      kernels::place_pairs<<<blocks(P), kernels::kBlock, 0, stream()>>>(
          sorted_expert, sorted_pair, P, sorted_start, kept, out.row_offsets.data(),
          out.pair_token.data(), out.pair_row.data(), out.row_pair.data(), out.row_expert.data(),
          out.row_token.data());
      detail::check_launch("moe::cuda::kernels::place_pairs");
    }
    synchronize("cudaStreamSynchronize (dispatch)");
  }

 private:
  // One expert's product, row-major C = op(A) op(B) + beta C, with A and B
  // at offsets (in elements) into the operands.
  struct Problem {
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

  // One device, its stream, cuBLAS handle and scratch; shared by copies of
  // the backend (the layer keeps one).
  struct Context {
    explicit Context(int dev) : device(dev) {
      const int n = device_count();
      moe::detail::require(n > 0, "moe::cuda::Backend: device=", dev,
                           ", but no CUDA device is available (cudaGetDeviceCount found none)");
      moe::detail::require(dev >= 0 && dev < n, "moe::cuda::Backend: device=", dev,
                           ", expected 0 <= device < ", n, " (the CUDA devices found)");
      detail::check(cudaSetDevice(dev), "cudaSetDevice");
      detail::check(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, dev),
                    "cudaDeviceGetAttribute (multiprocessors)");
      detail::check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking),
                    "cudaStreamCreateWithFlags");
      try {
        detail::check(cublasCreate(&blas), "cublasCreate");
        detail::check(cublasSetStream(blas, stream), "cublasSetStream");
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
    int device = 0;
    int multiprocessors = 1;
    cudaStream_t stream = nullptr;
    cublasHandle_t blas = nullptr;
    DeviceScratch scratch;   // CUB temp storage, sort keys, flags
    DeviceScratch operands;  // bf16 copies of grouped GEMM operands
    // The grouped GEMMs' problems and, for the grouped cuBLAS call, its
    // per-group arrays (host) and pointer arrays (device): reused per call.
    std::vector<Problem> problems;
    GroupedArrays grouped;
    DeviceScratch pointers;
  };

  // The expert GEMM operands as the GEMM reads them: the fp32 pointers, or
  // bf16 copies of them in the context's operand scratch.
  struct Operands {
    const void* a;
    const void* b;
  };

  // Both operands whole (the weight-gradient products: A and B are rows).
  Operands operands(const float* a, Index a_size, const float* b, Index b_size) const {
    if constexpr (std::is_same_v<T, float>) {
      return {a, b};
    } else {
      ScratchPlan plan;
      const auto a_at = plan.add<T>(a_size), b_at = plan.add<T>(b_size);
      void* base = context_->operands.reserve(plan.bytes());
      auto* a16 = ScratchPlan::at<T>(base, a_at);
      auto* b16 = ScratchPlan::at<T>(base, b_at);
      convert(a, a_size, a16);
      convert(b, b_size, b16);
      return {a16, b16};
    }
  }

  // A whole, and of the per-expert weights B (E slices of b_stride) only the
  // slices of experts with rows: an idle expert's weights are not converted.
  Operands expert_operands(const std::vector<Index>& offsets, const float* a, Index a_size,
                           const float* b, Index b_stride) const {
    if constexpr (std::is_same_v<T, float>) {
      return {a, b};
    } else {
      const Index E = static_cast<Index>(offsets.size()) - 1;
      ScratchPlan plan;
      const auto a_at = plan.add<T>(a_size), b_at = plan.add<T>(E * b_stride);
      void* base = context_->operands.reserve(plan.bytes());
      auto* a16 = ScratchPlan::at<T>(base, a_at);
      auto* b16 = ScratchPlan::at<T>(base, b_at);
      convert(a, a_size, a16);
      for (Index e = 0; e < E; ++e)
        if (offsets[e + 1] > offsets[e]) convert(b + e * b_stride, b_stride, b16 + e * b_stride);
      return {a16, b16};
    }
  }

  void convert(const float* src, Index n, T* dst) const {
    if (n <= 0) return;
    kernels::convert<<<blocks(n), kernels::kBlock, 0, stream()>>>(src, n, dst);
    detail::check_launch("moe::cuda::kernels::convert (to bf16)");
  }

  // Runs every problem: fp32 in one grouped cuBLAS call where cuBLAS has
  // one (12.5 and later), else one call per problem. bf16 always takes one
  // cublasGemmEx per problem: the grouped call has no bf16 x bf16 -> fp32
  // combination (its bf16 products write bf16), and the layer accumulates
  // in fp32 (C, and the weight gradients with beta = 1).
  static constexpr bool kGroupedCall = std::is_same_v<T, float> && CUBLAS_VERSION >= 120500;

  void run(const std::vector<Problem>& problems, const Operands& ops, float beta) const {
    if (problems.empty()) return;
    if constexpr (kGroupedCall) {
      grouped_sgemm(problems, ops, beta);
    } else {
      for (const Problem& q : problems) expert_gemm(q, ops, beta);
    }
  }

  // One cublasGemmGroupedBatchedEx call, one group of one product per
  // problem (sizes differ per expert). Row-major to column-major as in sgemm:
  // cuBLAS gets B first, with m and n swapped.
  void grouped_sgemm(const std::vector<Problem>& problems, const Operands& ops, float beta) const {
#if CUBLAS_VERSION >= 120500
    GroupedArrays& g = context_->grouped;
    g.clear();
    const auto* a = static_cast<const float*>(ops.a);
    const auto* b = static_cast<const float*>(ops.b);
    // The pointer arrays, for the device: cuBLAS's A (our B) of every
    // problem, then its B (our A), then C.
    const std::size_t count = problems.size();
    g.pointers.assign(3 * count, nullptr);
    for (std::size_t i = 0; i < count; ++i) {
      const Problem& q = problems[i];
      require_int_sizes(q.m, q.n, q.k, q.lda, q.ldb, q.ldc);
      g.trans_a.push_back(op(q.trans_b));
      g.trans_b.push_back(op(q.trans_a));
      g.m.push_back(static_cast<int>(q.n));
      g.n.push_back(static_cast<int>(q.m));
      g.k.push_back(static_cast<int>(q.k));
      g.lda.push_back(static_cast<int>(q.ldb));
      g.ldb.push_back(static_cast<int>(q.lda));
      g.ldc.push_back(static_cast<int>(q.ldc));
      g.alpha.push_back(1.0f);
      g.beta.push_back(beta);
      g.group_size.push_back(1);
      g.pointers[i] = b + q.b_offset;
      g.pointers[count + i] = a + q.a_offset;
      g.pointers[2 * count + i] = q.c;
    }
    const std::size_t bytes = g.pointers.size() * sizeof(void*);
    auto** device = static_cast<const void**>(context_->pointers.reserve(bytes));
    detail::check(
        cudaMemcpyAsync(device, g.pointers.data(), bytes, cudaMemcpyHostToDevice, stream()),
        "cudaMemcpyAsync (grouped GEMM pointers)");
    detail::check(
        cublasGemmGroupedBatchedEx(
            context_->blas, g.trans_a.data(), g.trans_b.data(), g.m.data(), g.n.data(), g.k.data(),
            g.alpha.data(), device, CUDA_R_32F, g.lda.data(), device + count, CUDA_R_32F,
            g.ldb.data(), g.beta.data(), const_cast<void* const*>(device + 2 * count), CUDA_R_32F,
            g.ldc.data(), static_cast<int>(count), g.group_size.data(), CUBLAS_COMPUTE_32F),
        "cublasGemmGroupedBatchedEx (fp32 expert GEMMs)");
#else
    (void)problems, (void)ops, (void)beta;  // never called: kGroupedCall is false
#endif
  }

  // One expert's product on operands (offsets in elements of T), fp32 output
  // and accumulation. Row-major C = op(A) op(B) is column-major
  // C^T = op(B)^T op(A)^T: cuBLAS gets B first, with the same transposes.
  void expert_gemm(const Problem& q, const Operands& ops, float beta) const {
    const T* a = static_cast<const T*>(ops.a) + q.a_offset;
    const T* b = static_cast<const T*>(ops.b) + q.b_offset;
    if constexpr (std::is_same_v<T, float>) {
      sgemm(q.trans_a, q.trans_b, q.m, q.n, q.k, 1.0f, a, q.lda, b, q.ldb, beta, q.c, q.ldc);
    } else {
      require_int_sizes(q.m, q.n, q.k, q.lda, q.ldb, q.ldc);
      const float alpha = 1.0f;
      detail::check(
          cublasGemmEx(context_->blas, op(q.trans_b), op(q.trans_a), static_cast<int>(q.n),
                       static_cast<int>(q.m), static_cast<int>(q.k), &alpha, b, CUDA_R_16BF,
                       static_cast<int>(q.ldb), a, CUDA_R_16BF, static_cast<int>(q.lda), &beta, q.c,
                       CUDA_R_32F, static_cast<int>(q.ldc), CUBLAS_COMPUTE_32F,
                       CUBLAS_GEMM_DEFAULT),
          "cublasGemmEx (bf16 expert GEMM)");
    }
  }

  void sgemm(bool trans_a, bool trans_b, Index m, Index n, Index k, float alpha, const float* a,
             Index lda, const float* b, Index ldb, float beta, float* c, Index ldc) const {
    require_int_sizes(m, n, k, lda, ldb, ldc);
    detail::check(
        cublasSgemm(context_->blas, op(trans_b), op(trans_a), static_cast<int>(n),
                    static_cast<int>(m), static_cast<int>(k), &alpha, b, static_cast<int>(ldb), a,
                    static_cast<int>(lda), &beta, c, static_cast<int>(ldc)),
        "cublasSgemm");
  }

  static cublasOperation_t op(bool transpose) { return transpose ? CUBLAS_OP_T : CUBLAS_OP_N; }

  static void require_int_sizes(Index m, Index n, Index k, Index lda, Index ldb, Index ldc) {
    moe::detail::require(std::max({m, n, k, lda, ldb, ldc}) <= Index{INT_MAX},
                         "moe::cuda::Backend: a GEMM size or stride above INT_MAX (m=", m,
                         ", n=", n, ", k=", k, "), expected what cuBLAS can index");
  }

  // Blocks of kBlock threads for n threads' work, at most max_blocks().
  unsigned blocks(Index n) const {
    return static_cast<unsigned>(
        std::min((n + kernels::kBlock - 1) / kernels::kBlock, max_blocks()));
  }
  // The largest grid (in blocks) a loop launches; kernels grid-stride beyond.
  Index max_blocks() const { return Index{32} * context_->multiprocessors; }

  cudaStream_t stream() const { return context_->stream; }
  void activate() const { detail::check(cudaSetDevice(context_->device), "cudaSetDevice"); }
  void synchronize(const char* what) const { detail::check(cudaStreamSynchronize(stream()), what); }

  std::shared_ptr<Context> context_;
};

static_assert(BackendPolicy<Backend<float>>);
static_assert(BackendPolicy<Backend<__nv_bfloat16>>);

}  // namespace moe::cuda
