#pragma once
// moe::cpu::Backend<T>: host memory, Eigen GEMMs, OpenMP loops and the
// counting-sort dispatch. Everything the layer and the routers do to data goes
// through these few primitives, so the CUDA backend provides the same ones.
//
// Determinism: parallel loops only ever split independent work items whose
// boundaries do not depend on the thread count, and each GEMM runs on one
// thread, so results are bitwise identical for any number of threads.

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <vector>

#include "moe/core/concepts.hpp"
#include "moe/core/error.hpp"
#include "moe/core/routing.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace moe::cpu {

template <class T>
class Backend {
 public:
  using Scalar = T;
  template <class U>
  using Buffer = std::vector<U>;
  static constexpr const char* kName = "cpu";

  // threads = 0: OpenMP's default (OMP_NUM_THREADS or all cores).
  explicit Backend(int threads = 0) : threads_(threads) {
    detail::require(threads >= 0, "moe::cpu::Backend: threads=", threads, ", expected >= 0");
  }

  int threads() const {
#if defined(_OPENMP)
    return threads_ > 0 ? threads_ : omp_get_max_threads();
#else
    return 1;
#endif
  }

  // f(i) for every i in [0, n), in parallel when the loop does at least
  // kMinParallelWork units of `work` in total (roughly flops; opening a
  // parallel region costs microseconds). f must not depend on the order.
  template <class F>
  void parallel_for(Index n, F&& f, Index work = kMinParallelWork) const {
#if defined(_OPENMP)
    const bool parallel = n > 1 && work >= kMinParallelWork && threads() > 1;
#pragma omp parallel for schedule(guided) num_threads(threads()) if (parallel)
#endif
    for (Index i = 0; i < n; ++i) f(i);
  }

  static constexpr Index kMinParallelWork = 1 << 15;

  // Row-major C(m, n) = alpha * op(A) * op(B) + beta * C on one thread, with
  // op(A) of shape (m, k) and op(B) of shape (k, n). lda/ldb/ldc are row strides.
  template <class S>
  void gemm(bool trans_a, bool trans_b, Index m, Index n, Index k, S alpha, const S* a, Index lda,
            const S* b, Index ldb, S beta, S* c, Index ldc) const {
    using Mat = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    using Stride = Eigen::OuterStride<>;
    Eigen::Map<Mat, 0, Stride> C(c, m, n, Stride(ldc));
    if (m == 0 || n == 0) return;
    SerialEigen serial;  // Eigen's own threading would change the summation order
    if (beta == S(0)) {
      C.setZero();
    } else if (beta != S(1)) {
      C *= beta;
    }
    if (k == 0) return;
    const Eigen::Map<const Mat, 0, Stride> A(a, trans_a ? k : m, trans_a ? m : k, Stride(lda));
    const Eigen::Map<const Mat, 0, Stride> B(b, trans_b ? n : k, trans_b ? k : n, Stride(ldb));
    if (!trans_a && !trans_b) C.noalias() += alpha * (A * B);
    if (!trans_a && trans_b) C.noalias() += alpha * (A * B.transpose());
    if (trans_a && !trans_b) C.noalias() += alpha * (A.transpose() * B);
    if (trans_a && trans_b) C.noalias() += alpha * (A.transpose() * B.transpose());
  }

  // Eigen threads a large product unless the calling thread's OpenMP team is
  // larger than one or its nthreads ICV is 1, and it sizes its blocking (so the
  // order of the sums) by the thread count. Setting this thread's ICV to 1 for
  // the duration of one GEMM keeps every product on Eigen's serial path; the
  // ICV is per thread, so nothing else is affected. (A process-wide
  // Eigen::setNbThreads(n > 1) overrides it: leave it unset for determinism.)
  struct SerialEigen {
#if defined(_OPENMP)
    int saved = omp_get_max_threads();
    SerialEigen() {
      if (saved != 1) omp_set_num_threads(1);
    }
    ~SerialEigen() {
      if (saved != 1) omp_set_num_threads(saved);
    }
    SerialEigen(const SerialEigen&) = delete;
    SerialEigen& operator=(const SerialEigen&) = delete;
#endif
  };

  // The same product with the rows of C split into fixed tiles of kRowTile run
  // in parallel: tile boundaries do not depend on the thread count.
  template <class S>
  void gemm_rows(bool trans_b, Index m, Index n, Index k, S alpha, const S* a, Index lda,
                 const S* b, Index ldb, S beta, S* c, Index ldc) const {
    const Index tiles = (m + kRowTile - 1) / kRowTile;
    parallel_for(
        tiles,
        [&](Index tile) {
          const Index r0 = tile * kRowTile;
          const Index rows = std::min(kRowTile, m - r0);
          gemm(false, trans_b, rows, n, k, alpha, a + r0 * lda, lda, b, ldb, beta, c + r0 * ldc,
               ldc);
        },
        m * n * k);
  }

  static constexpr Index kRowTile = 128;

  // For every expert e owning rows [offsets[e], offsets[e+1]):
  //   C_e (n_e, n) = A_e (n_e, k) * op(B_e) + beta * C_e,  B_e = b + e * b_stride,
  // op(B_e) of shape (k, n): B_e stored (k, n), or (n, k) when trans_b.
  // Work items are (expert, row tile), fixed for a given routing.
  template <class S>
  void grouped_gemm(const std::vector<Index>& offsets, bool trans_b, Index n, Index k, const S* a,
                    const S* b, Index b_stride, S beta, S* c) const {
    const Index E = static_cast<Index>(offsets.size()) - 1;
    std::vector<Index>& tiles = tile_scratch_;
    tiles.clear();
    for (Index e = 0; e < E; ++e)
      for (Index r = offsets[e]; r < offsets[e + 1]; r += kRowTile) {
        tiles.push_back(e);
        tiles.push_back(r);
      }
    const Index count = static_cast<Index>(tiles.size()) / 2;
    parallel_for(
        count,
        [&](Index i) {
          const Index e = tiles[2 * i], r0 = tiles[2 * i + 1];
          const Index rows = std::min(kRowTile, offsets[e + 1] - r0);
          gemm(false, trans_b, rows, n, k, S(1), a + r0 * k, k, b + e * b_stride, trans_b ? k : n,
               beta, c + r0 * n, n);
        },
        offsets.back() * n * k);
  }

  // For every expert e: W_e (k, n) += A_e^T (k, n_e) * B_e (n_e, n), with
  // W_e = w + e * w_stride: the weight gradient, one GEMM per expert.
  template <class S>
  void grouped_gemm_tn(const std::vector<Index>& offsets, Index k, Index n, const S* a, const S* b,
                       S* w, Index w_stride) const {
    const Index E = static_cast<Index>(offsets.size()) - 1;
    parallel_for(
        E,
        [&](Index e) {
          const Index r0 = offsets[e], rows = offsets[e + 1] - offsets[e];
          gemm(true, false, k, n, rows, S(1), a + r0 * k, k, b + r0 * n, n, S(1), w + e * w_stride,
               n);
        },
        offsets.back() * n * k);
  }

  // offsets[0] = 0, offsets[i + 1] = offsets[i] + counts[i] (an exclusive scan
  // with the total appended); returns the total, which the caller needs on the
  // host to size the next buffers.
  Index offsets_from_counts(const Index* counts, Index n, Index* offsets) const {
    offsets[0] = 0;
    for (Index i = 0; i < n; ++i) offsets[i + 1] = offsets[i] + counts[i];
    return offsets[n];
  }

  // Index of the first NaN or Inf in p[0, n), or -1.
  template <class S>
  Index first_non_finite(const S* p, Index n) const {
    for (Index i = 0; i < n; ++i)
      if (!std::isfinite(p[i])) return i;
    return -1;
  }

  // Counting sort of the selected pairs by expert (stable: token order inside an
  // expert), keeping at most `capacity` pairs per expert (capacity < 0: all).
  template <class S>
  void dispatch(const Selection<S, Buffer>& sel, Index capacity, Dispatch<Buffer>& out) const {
    const Index E = sel.experts;
    const Index P = sel.pairs();
    out.selected_per_expert.assign(static_cast<std::size_t>(E), 0);
    out.pair_token.resize(static_cast<std::size_t>(P));
    for (Index t = 0; t < sel.tokens; ++t) {
      for (Index p = sel.token_offsets[t]; p < sel.token_offsets[t + 1]; ++p) {
        out.pair_token[p] = t;
        ++out.selected_per_expert[sel.pair_expert[p]];
      }
    }
    out.rows_per_expert.resize(static_cast<std::size_t>(E));
    out.expert_offsets.assign(static_cast<std::size_t>(E + 1), 0);
    out.row_expert.resize(0);
    for (Index e = 0; e < E; ++e) {
      const Index n = out.selected_per_expert[e];
      out.rows_per_expert[e] = capacity < 0 ? n : std::min(n, capacity);
      out.expert_offsets[e + 1] = out.expert_offsets[e] + out.rows_per_expert[e];
    }
    out.row_pair.resize(static_cast<std::size_t>(out.expert_offsets[E]));
    out.row_expert.resize(static_cast<std::size_t>(out.expert_offsets[E]));
    out.row_token.resize(static_cast<std::size_t>(out.expert_offsets[E]));
    for (Index e = 0; e < E; ++e)
      for (Index r = out.expert_offsets[e]; r < out.expert_offsets[e + 1]; ++r)
        out.row_expert[r] = static_cast<int>(e);
    out.pair_row.resize(static_cast<std::size_t>(P));
    std::vector<Index> next(out.expert_offsets.begin(), out.expert_offsets.end() - 1);
    out.dropped = 0;
    for (Index p = 0; p < P; ++p) {
      const int e = sel.pair_expert[p];
      if (next[e] < out.expert_offsets[e + 1]) {
        out.pair_row[p] = next[e];
        out.row_token[next[e]] = out.pair_token[p];
        out.row_pair[next[e]++] = p;
      } else {
        out.pair_row[p] = -1;
        ++out.dropped;
      }
    }
  }

 private:
  int threads_ = 0;
  mutable std::vector<Index> tile_scratch_;  // reused: no allocation per call once sized
};

static_assert(BackendPolicy<Backend<float>>);
static_assert(BackendPolicy<Backend<double>>);

}  // namespace moe::cpu
