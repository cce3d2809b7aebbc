#pragma once
// moe::cpu::Backend<T>: host memory, BLAS or Eigen GEMMs, OpenMP loops and the
// counting-sort dispatch. Everything the layer and the routers do to data goes
// through these few primitives, so the CUDA backend provides the same ones.
//
// Determinism: work is split into tiles whose boundaries depend on the shapes
// and the routing only, never on the thread count, and every tile is one
// product on one thread (BLAS and Eigen kept serial inside it). Results are
// therefore bitwise identical for any number of threads.

#include <Eigen/Core>
#include <algorithm>
#include <climits>
#include <cmath>
#include <memory_resource>
#include <type_traits>
#include <utility>
#include <vector>

#include "moe/backend/cpu/blas.hpp"
#include "moe/core/concepts.hpp"
#include "moe/core/error.hpp"
#include "moe/core/routing.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace moe::cpu {

// The SIMD registers of the target, as Eigen's packet code counts them.
#if defined(EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS)
inline constexpr int kVectorRegisters = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS;
#else
inline constexpr int kVectorRegisters = 16;
#endif

template <class T>
class Backend {
 public:
  using Scalar = T;
  template <class U>
  using Buffer = std::vector<U>;
  static constexpr const char* kName = "cpu";

  // threads = 0: OpenMP's default (OMP_NUM_THREADS or all cores).
  // gemm: the engine of the large products (see Gemm); Gemm::blas needs a
  // build with a CBLAS (MOE_HAVE_CBLAS).
  explicit Backend(int threads = 0, Gemm gemm = Gemm::automatic)
      : threads_(threads), gemm_(resolve(gemm)) {
    detail::require(threads >= 0, "moe::cpu::Backend: threads=", threads, ", expected >= 0");
  }

  int threads() const {
#if defined(_OPENMP)
    return threads_ > 0 ? threads_ : omp_get_max_threads();
#else
    return 1;
#endif
  }

  // Parameters, gradients and state live in host memory.
  std::pmr::memory_resource* memory_resource() const { return std::pmr::new_delete_resource(); }

  // n values from backend memory (here: host memory) to the host.
  template <class U>
  void copy_to_host(U* dst, const U* src, Index n) const {
    std::copy(src, src + n, dst);
  }

  // The engine that runs this backend's products of T (never automatic).
  Gemm gemm_engine() const { return blas::kHasGemm<T> ? gemm_ : Gemm::eigen; }

  // f(i) for every i in [0, n), in parallel when the loop does at least
  // kMinParallelWork units of `work` in total (roughly flops; opening a
  // parallel region costs microseconds). f must not depend on the order.
  template <class F>
  void parallel_for(Index n, F&& f, Index work = kMinParallelWork) const {
#if defined(_OPENMP)
    // A serial loop never enters a parallel region: libgomp allocates a
    // fresh team for every one-thread region.
    if (n > 1 && work >= kMinParallelWork && threads() > 1) {
#pragma omp parallel for schedule(guided) num_threads(threads())
      for (Index i = 0; i < n; ++i) f(i);
      return;
    }
#endif
    for (Index i = 0; i < n; ++i) f(i);
  }

  // f(r, begin, end) for every row r in [0, rows): columns [begin, end) of
  // a row of `cols` columns. Here every call covers a whole row (0, cols);
  // another backend may cut rows into spans (the CUDA one: one column per
  // thread, so that neighbouring threads read neighbouring values). f must
  // therefore compute each column on its own, never across columns.
  template <class F>
  void parallel_for_rows(Index rows, Index cols, F&& f, Index work = kMinParallelWork) const {
    if (cols <= 0) return;
    parallel_for(
        rows, [&](Index r) { f(r, Index{0}, cols); }, work);
  }

  // store(i, sum over j in [0, len) of term(i, j)) for every i in [0, n),
  // in parallel over i. Here the sum runs in order of j; another backend may
  // add the terms in another order (the CUDA one: a warp's tree), so results
  // agree to rounding only.
  template <class Term, class Store>
  void parallel_sum_rows(Index n, Index len, Term&& term, Store&& store,
                         Index work = kMinParallelWork) const {
    using Sum = std::decay_t<decltype(term(Index{}, Index{}))>;
    parallel_for(
        n,
        [&](Index i) {
          Sum sum = 0;
          for (Index j = 0; j < len; ++j) sum += term(i, j);
          store(i, sum);
        },
        work);
  }

  static constexpr Index kMinParallelWork = 1 << 15;

  // Row-major C(m, n) = alpha * op(A) * op(B) + beta * C on the calling
  // thread, with op(A) of shape (m, k) and op(B) of shape (k, n). lda/ldb/ldc
  // are row strides. At most kSkinnyRows rows (decode batches, small
  // experts) take a kernel that reads B once; larger products go to the
  // engine (BLAS or Eigen).
  template <class S>
  void gemm(bool trans_a, bool trans_b, Index m, Index n, Index k, S alpha, const S* a, Index lda,
            const S* b, Index ldb, S beta, S* c, Index ldc) const {
    if (m == 0 || n == 0) return;
    if (k == 0) {
      scale(m, n, beta, c, ldc);
      return;
    }
    if (!trans_a && m <= kSkinnyRows) {
      skinny_gemm(trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
      return;
    }
    if constexpr (blas::kHasGemm<S>) {  // compiled only where the BLAS has this type
      if (gemm_ == Gemm::blas) {
        check_blas_sizes(m, n, k, lda, ldb, ldc);
        blas::SerialScope serial;
        SerialOpenMP serial_icv;  // an OpenMP OpenBLAS threads by this thread's ICV
        blas::gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
        return;
      }
    }
    eigen_gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }

  static constexpr Index kSkinnyRows = 8;

  // The same product with the rows of C split into fixed tiles of kRowTile run
  // in parallel: tile boundaries do not depend on the thread count.
  template <class S>
  void gemm_rows(bool trans_b, Index m, Index n, Index k, S alpha, const S* a, Index lda,
                 const S* b, Index ldb, S beta, S* c, Index ldc) const {
    const Index tiles = (m + kRowTile - 1) / kRowTile;
    check_blas_sizes(std::min(m, kRowTile), n, k, lda, ldb, ldc);  // not inside the region
    // One serial-BLAS scope for the whole loop, not one per tile.
    const blas::SerialScope serial(gemm_ == Gemm::blas);
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
  // Work items are (expert, row tile, column tile) tiles of C, fixed for a
  // given routing (see plan_tiles).
  template <class S>
  void grouped_gemm(const std::vector<Index>& offsets, bool trans_b, Index n, Index k, const S* a,
                    const S* b, Index b_stride, S beta, S* c) const {
    const auto& tiles = plan_tiles(offsets, n, /*split_rows=*/true, kMinTiles);
    check_blas_sizes(kTileRows, n, k, k, trans_b ? k : n, n);  // not inside the region
    const blas::SerialScope serial(gemm_ == Gemm::blas);
    parallel_for(
        static_cast<Index>(tiles.size()),
        [&](Index i) {
          const Tile& t = tiles[static_cast<std::size_t>(i)];
          const S* bt = b + t.expert * b_stride + (trans_b ? t.col * k : t.col);
          gemm(false, trans_b, t.rows, t.cols, k, S(1), a + t.row * k, k, bt, trans_b ? k : n, beta,
               c + t.row * n + t.col, n);
        },
        offsets.back() * n * k);
  }

  // For every expert e: W_e (k, n) += A_e^T (k, n_e) * B_e (n_e, n), with
  // W_e = w + e * w_stride: the weight gradient. Tiles split the columns of
  // W_e, never the rows of A_e (the sum), so each element's order is fixed.
  template <class S>
  void grouped_gemm_tn(const std::vector<Index>& offsets, Index k, Index n, const S* a, const S* b,
                       S* w, Index w_stride) const {
    const auto& tiles = plan_tiles(offsets, n, /*split_rows=*/false, kMinWeightGradientTiles);
    check_blas_sizes(k, n, offsets.back(), k, n, n);  // not inside the region
    const blas::SerialScope serial(gemm_ == Gemm::blas);
    parallel_for(
        static_cast<Index>(tiles.size()),
        [&](Index i) {
          const Tile& t = tiles[static_cast<std::size_t>(i)];
          gemm(true, false, k, t.cols, t.rows, S(1), a + t.row * k, k, b + t.row * n + t.col, n,
               S(1), w + t.expert * w_stride + t.col, n);
        },
        offsets.back() * n * k);
  }

  // Tiling: rows of an expert in near-equal tiles of at most kTileRows (big
  // enough that a BLAS amortises packing B, small enough to balance the
  // threads), then, while there are fewer than a minimum of tiles, columns in
  // near-equal tiles that are a multiple of kColumnAlign wide.
  // - kMinTiles = 2 for the products that read the weights row by row: a
  //   column tile reads part of every 4 KiB page of a row-major weight, which
  //   defeats the hardware prefetcher, so decode batches (a few rows per
  //   expert) are split over experts first and halved at most.
  // - kMinWeightGradientTiles = 16 for the weight gradients, which cannot split
  //   rows (their sum) and are compute-bound: enough tiles to balance the
  //   threads when E is small.
  static constexpr Index kTileRows = 512;
  static constexpr Index kMinTiles = 2;
  static constexpr Index kMinWeightGradientTiles = 16;
  static constexpr Index kColumnAlign = 64;

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
    out.row_offsets.assign(out.expert_offsets.begin(), out.expert_offsets.end());
    out.row_pair.resize(static_cast<std::size_t>(out.expert_offsets[E]));
    out.row_expert.resize(static_cast<std::size_t>(out.expert_offsets[E]));
    out.row_token.resize(static_cast<std::size_t>(out.expert_offsets[E]));
    for (Index e = 0; e < E; ++e)
      for (Index r = out.expert_offsets[e]; r < out.expert_offsets[e + 1]; ++r)
        out.row_expert[r] = static_cast<int>(e);
    out.pair_row.resize(static_cast<std::size_t>(P));
    // Each expert's next free row: rows_per_expert is reused as the cursor
    // (no allocation) and holds the counts again once every pair is placed.
    Index* filled = out.rows_per_expert.data();
    std::fill(filled, filled + E, Index{0});
    out.dropped = 0;
    for (Index p = 0; p < P; ++p) {
      const int e = sel.pair_expert[p];
      const Index row = out.expert_offsets[e] + filled[e];
      if (row < out.expert_offsets[e + 1]) {
        out.pair_row[p] = row;
        out.row_token[row] = out.pair_token[p];
        out.row_pair[row] = p;
        ++filled[e];
      } else {
        out.pair_row[p] = -1;
        ++out.dropped;
      }
    }
  }

 private:
  struct Tile {
    Index expert, row, rows, col, cols;
  };

  // CBLAS takes int sizes. Checked before a parallel region: an exception
  // must not leave an OpenMP region (that would terminate the program).
  void check_blas_sizes(Index m, Index n, Index k, Index lda, Index ldb, Index ldc) const {
    if (gemm_ != Gemm::blas) return;
    detail::require(std::max({m, n, k, lda, ldb, ldc}) <= Index{INT_MAX},
                    "moe::cpu::Backend: a GEMM size or stride above INT_MAX (m=", m, ", n=", n,
                    ", k=", k, "), expected what a CBLAS can index");
  }

  static Gemm resolve(Gemm gemm) {
    detail::require(gemm != Gemm::blas || blas::kAvailable,
                    "moe::cpu::Backend: gemm=blas, expected automatic or eigen (this build has no "
                    "CBLAS: configure with MOE_USE_BLAS=ON and a BLAS installed, e.g. Debian's "
                    "libopenblas-dev)");
    return gemm == Gemm::automatic ? (blas::kAvailable ? Gemm::blas : Gemm::eigen) : gemm;
  }

  // Work items for a grouped product; reuses its storage (no allocation once
  // the largest routing has been seen).
  const std::vector<Tile>& plan_tiles(const std::vector<Index>& offsets, Index n, bool split_rows,
                                      Index min_tiles) const {
    auto& tiles = tile_scratch_;
    tiles.clear();
    const Index E = static_cast<Index>(offsets.size()) - 1;
    const auto row_parts = [&](Index rows) {  // an expert's row tiles
      return rows == 0 ? 0 : split_rows ? (rows + kTileRows - 1) / kTileRows : 1;
    };
    Index row_tiles = 0;
    for (Index e = 0; e < E; ++e) row_tiles += row_parts(offsets[e + 1] - offsets[e]);
    if (row_tiles == 0) return tiles;
    const Index max_col_tiles = std::max<Index>(1, n / kColumnAlign);
    const Index col_tiles = std::min(max_col_tiles, (min_tiles + row_tiles - 1) / row_tiles);
    // Column boundary i: n i / col_tiles rounded down to kColumnAlign (the
    // last one is n), so tiles differ by at most kColumnAlign columns.
    const auto boundary = [&](Index i) {
      return i == col_tiles ? n : n * i / col_tiles / kColumnAlign * kColumnAlign;
    };
    tiles.reserve(static_cast<std::size_t>(row_tiles * col_tiles));
    for (Index e = 0; e < E; ++e) {
      const Index begin = offsets[e], rows = offsets[e + 1] - begin;
      const Index parts = row_parts(rows);
      for (Index p = 0; p < parts; ++p) {
        const Index r0 = begin + rows * p / parts, r1 = begin + rows * (p + 1) / parts;
        for (Index c = 0; c < col_tiles; ++c)
          tiles.push_back({e, r0, r1 - r0, boundary(c), boundary(c + 1) - boundary(c)});
      }
    }
    return tiles;
  }

  // C = beta C (the product of an empty sum).
  template <class S>
  static void scale(Index m, Index n, S beta, S* c, Index ldc) {
    if (beta == S(1)) return;
    for (Index i = 0; i < m; ++i)
      for (Index j = 0; j < n; ++j) c[i * ldc + j] = beta == S(0) ? S(0) : beta * c[i * ldc + j];
  }

  // Few rows: stream B once, each element of B used for every row of A while
  // it is in registers (skinny_rows) or L1 (the dot products for trans_b).
  template <class S>
  static void skinny_gemm(bool trans_b, Index m, Index n, Index k, S alpha, const S* a, Index lda,
                          const S* b, Index ldb, S beta, S* c, Index ldc) {
    using ConstRowMap = Eigen::Map<const Eigen::Matrix<S, 1, Eigen::Dynamic>>;
    scale(m, n, beta, c, ldc);
    if (!trans_b) {
      // The row count as a compile-time constant (accumulators in registers):
      // the one M in 1..kSkinnyRows that equals m.
      const auto run_rows = [&]<int... M>(std::integer_sequence<int, M...>) {
        (void)((m == M + 1 && (skinny_rows<M + 1>(n, k, alpha, a, lda, b, ldb, c, ldc), true)) ||
               ...);
      };
      run_rows(std::make_integer_sequence<int, static_cast<int>(kSkinnyRows)>{});
    } else {
      // C_ij += alpha <A_i, B_j>: B's rows are read once, A's stay cached.
      for (Index j = 0; j < n; ++j) {
        const ConstRowMap bj(b + j * ldb, k);
        for (Index i = 0; i < m; ++i) c[i * ldc + j] += alpha * ConstRowMap(a + i * lda, k).dot(bj);
      }
    }
  }

  // C (M, n) += alpha A (M, k) B (k, n), M <= kSkinnyRows, in chunks of
  // kSkinnyDepth rows of B. Inside a chunk, each block of columns keeps its
  // M x block accumulators in SIMD registers across the chunk, so C is read
  // and written once per chunk, not once per row of B; the column blocks
  // walk the chunk's 16 rows of B left to right (16 contiguous streams the
  // prefetcher follows). Each element still sums over p in order.
  template <int M, class S>
  static void skinny_rows(Index n, Index k, S alpha, const S* a, Index lda, const S* b, Index ldb,
                          S* c, Index ldc) {
    using Packet = typename Eigen::internal::packet_traits<S>::type;
    constexpr Index kLanes = Eigen::internal::packet_traits<S>::size;
    // Packets per row so that M rows of accumulators, one row of B and the
    // broadcast fit the vector registers (16 for SSE/AVX2, 32 for AVX-512).
    constexpr int kPackets = std::clamp((kVectorRegisters - 1) / (M + 1), 1, 4);
    constexpr Index kBlock = kLanes * kPackets;
    namespace ei = Eigen::internal;
    for (Index p0 = 0; p0 < k; p0 += kSkinnyDepth) {
      const Index p1 = std::min(k, p0 + kSkinnyDepth);
      Index j0 = 0;
      for (; j0 + kBlock <= n; j0 += kBlock) {
        Packet acc[M][kPackets];
        for (int i = 0; i < M; ++i)
          for (int v = 0; v < kPackets; ++v)
            acc[i][v] = ei::ploadu<Packet>(c + i * ldc + j0 + v * kLanes);
        for (Index p = p0; p < p1; ++p) {
          const S* bp = b + p * ldb + j0;
          Packet bv[kPackets];
          for (int v = 0; v < kPackets; ++v) bv[v] = ei::ploadu<Packet>(bp + v * kLanes);
          for (int i = 0; i < M; ++i) {
            const Packet ai = ei::pset1<Packet>(alpha * a[i * lda + p]);
            for (int v = 0; v < kPackets; ++v) acc[i][v] = ei::pmadd(ai, bv[v], acc[i][v]);
          }
        }
        for (int i = 0; i < M; ++i)
          for (int v = 0; v < kPackets; ++v) ei::pstoreu(c + i * ldc + j0 + v * kLanes, acc[i][v]);
      }
      for (; j0 < n; ++j0)  // the last columns, one at a time, in the same order
        for (Index p = p0; p < p1; ++p)
          for (int i = 0; i < M; ++i)
            c[i * ldc + j0] = ei::pmadd(alpha * a[i * lda + p], b[p * ldb + j0], c[i * ldc + j0]);
    }
  }

  static constexpr Index kSkinnyDepth = 16;

  // Eigen's GEMM on this thread. Eigen threads a large product unless the
  // calling thread's OpenMP team is larger than one or its nthreads ICV is 1,
  // and it sizes its blocking (so the order of the sums) by the thread count.
  // Setting this thread's ICV to 1 for the product keeps it on Eigen's serial
  // path; the ICV is per thread. (A process-wide Eigen::setNbThreads(n > 1)
  // overrides it: leave it unset for determinism.)
  template <class S>
  static void eigen_gemm(bool trans_a, bool trans_b, Index m, Index n, Index k, S alpha, const S* a,
                         Index lda, const S* b, Index ldb, S beta, S* c, Index ldc) {
    using Mat = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    using Stride = Eigen::OuterStride<>;
    Eigen::Map<Mat, 0, Stride> C(c, m, n, Stride(ldc));
    SerialOpenMP serial;
    if (beta == S(0)) {
      C.setZero();
    } else if (beta != S(1)) {
      C *= beta;
    }
    const Eigen::Map<const Mat, 0, Stride> A(a, trans_a ? k : m, trans_a ? m : k, Stride(lda));
    const Eigen::Map<const Mat, 0, Stride> B(b, trans_b ? n : k, trans_b ? k : n, Stride(ldb));
    if (!trans_a && !trans_b) C.noalias() += alpha * (A * B);
    if (!trans_a && trans_b) C.noalias() += alpha * (A * B.transpose());
    if (trans_a && !trans_b) C.noalias() += alpha * (A.transpose() * B);
    if (trans_a && trans_b) C.noalias() += alpha * (A.transpose() * B.transpose());
  }

  // This thread's OpenMP nthreads ICV at 1 for its lifetime (see eigen_gemm).
  struct SerialOpenMP {
#if defined(_OPENMP)
    int saved = omp_get_max_threads();
    SerialOpenMP() {
      if (saved != 1) omp_set_num_threads(1);
    }
    ~SerialOpenMP() {
      if (saved != 1) omp_set_num_threads(saved);
    }
    SerialOpenMP(const SerialOpenMP&) = delete;
    SerialOpenMP& operator=(const SerialOpenMP&) = delete;
#endif
  };

  int threads_ = 0;
  Gemm gemm_ = Gemm::eigen;
  mutable std::vector<Tile> tile_scratch_;  // reused: no allocation per call once sized
};

static_assert(BackendPolicy<Backend<float>>);
static_assert(BackendPolicy<Backend<double>>);

}  // namespace moe::cpu
