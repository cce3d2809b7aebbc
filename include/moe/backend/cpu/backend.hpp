#pragma once
// moe::cpu::Backend<T>: host memory, BLAS or Eigen GEMMs, OpenMP loops and the
// counting-sort dispatch. Everything the layer and the routers do to data goes
// through these few primitives, so the CUDA backend provides the same ones.
//
// Determinism: work is split into tiles whose boundaries depend on the shapes
// and the routing only, never on the thread count, and every tile is one
// product on one thread (BLAS, Eigen and oneDNN kept serial inside it).
// Results are therefore bitwise identical for any number of threads.

#include <algorithm>
#include <climits>
#include <cmath>
#include <memory_resource>
#include <type_traits>
#include <utility>
#include <vector>

#include "moe/backend/cpu/bf16_products.hpp"
#include "moe/backend/cpu/blas.hpp"
#include "moe/backend/cpu/memory.hpp"
#include "moe/backend/cpu/serial_gemm.hpp"
#include "moe/backend/cpu/tiling.hpp"
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
  // gemm: the engine of the large products (see Gemm); Gemm::blas needs a
  // build with a CBLAS (MOE_HAVE_CBLAS), Gemm::onednn_bf16 and onednn_f32 a
  // float backend linked with moe::onednn (MOE_HAVE_DNNL).
  explicit Backend(int threads = 0, Gemm gemm = Gemm::automatic)
      : threads_(threads), gemm_(resolve(gemm)), dense_(dense_engine(gemm_)) {
    moe::detail::require(threads >= 0, "moe::cpu::Backend: threads=", threads, ", expected >= 0");
  }

  int threads() const {
#if defined(_OPENMP)
    return threads_ > 0 ? threads_ : omp_get_max_threads();
#else
    return 1;
#endif
  }

  // Parameters, gradients and state live in host memory.
  std::pmr::memory_resource* memory_resource() const { return HugePageResource::instance(); }

  // n values from backend memory (here: host memory) to the host.
  template <class U>
  void copy_to_host(U* dst, const U* src, Index n) const {
    std::copy(src, src + n, dst);
  }

  // The engine that runs this backend's expert products of T (never
  // automatic).
  Gemm gemm_engine() const {
    const bool on_onednn = gemm_ == Gemm::onednn_bf16 || gemm_ == Gemm::onednn_f32;
    return on_onednn || blas::kHasGemm<T> ? gemm_ : Gemm::eigen;
  }

  // f(i) for every i in [0, n), in parallel when the loop does at least
  // kMinParallelWork units of `work` in total (roughly flops; opening a
  // parallel region costs microseconds). f must not depend on the order.
  template <class F>
  void parallel_for(Index n, F&& f, [[maybe_unused]] Index work = kMinParallelWork) const {
#if defined(_OPENMP)
    if (worth_a_team(n, work)) {
#pragma omp parallel for schedule(guided) num_threads(threads())
      for (Index i = 0; i < n; ++i) f(i);
      return;
    }
#endif
    for (Index i = 0; i < n; ++i) f(i);
  }

  // parallel_for over a few coarse items of uneven cost, the tiles of a
  // grouped product: each thread takes the next item when it is done.
  // (guided hands the first thread half the items at once; at decode sizes,
  // where most items are empty experts, that left one thread the work.)
  template <class F>
  void parallel_for_tiles(Index n, F&& f, [[maybe_unused]] Index work) const {
#if defined(_OPENMP)
    if (worth_a_team(n, work)) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads())
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
  // in parallel over i. Here each sum runs in the order of lane_sum, which
  // depends on len only; another backend may add the terms in another order
  // (the CUDA one: a warp's tree), so results agree to rounding only.
  template <class Term, class Store>
  void parallel_sum_rows(Index n, Index len, Term&& term, Store&& store,
                         Index work = kMinParallelWork) const {
    using Sum = std::decay_t<decltype(term(Index{}, Index{}))>;
    parallel_for(
        n, [&](Index i) { store(i, lane_sum<Sum>(len, [&](Index j) { return term(i, j); })); },
        work);
  }

  // The sum of term(j) over j in [0, len): kSumLanes running sums, lane l
  // over j = l, l + kSumLanes, ..., then lane[l] += lane[l + w] for
  // w = 8, 4, 2, 1, then the last len % kSumLanes terms in order. One
  // running sum is a chain of dependent additions the compiler may not
  // reorder (it would change the result); lanes let it vectorise the loop.
  // Sums shorter than kSumLanes run in order of j, as one running sum would.
  static constexpr int kSumLanes = 16;
  template <class Sum, class Term>
  static Sum lane_sum(Index len, Term&& term) {
    Sum lane[kSumLanes] = {};
    const Index whole = len - len % kSumLanes;  // the terms the lanes take
    for (Index j = 0; j < whole; j += kSumLanes)
      for (int l = 0; l < kSumLanes; ++l) lane[l] += term(j + l);
    for (int width = kSumLanes / 2; width > 0; width /= 2)
      for (int l = 0; l < width; ++l) lane[l] += lane[l + width];
    Sum sum = lane[0];
    for (Index j = whole; j < len; ++j) sum += term(j);
    return sum;
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
    const bool on_blas = runs_on_blas<S>(trans_a, m, n, k);
    if (on_blas) check_blas_sizes(m, n, k, lda, ldb, ldc);
    const blas::SerialScope serial(on_blas);
    product(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
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
    const blas::SerialScope serial(dense_ == Gemm::blas);
    parallel_for_tiles(
        tiles,
        [&](Index tile) {
          const Index r0 = tile * kRowTile;
          const Index rows = std::min(kRowTile, m - r0);
          product(false, trans_b, rows, n, k, alpha, a + r0 * lda, lda, b, ldb, beta, c + r0 * ldc,
                  ldc);
        },
        m * n * k);
  }

  static constexpr Index kRowTile = 128;

  // For every expert e owning rows [offsets[e], offsets[e+1]):
  //   C_e (n_e, n) = A_e (n_e, k) * op(B_e) + beta * C_e,  B_e = b + e * b_stride,
  // op(B_e) of shape (k, n): B_e stored (k, n), or (n, k) when trans_b.
  // Work items are (expert, row tile, column tile) tiles of C, fixed for a
  // given routing (see detail::TilePlan).
  template <class S>
  void grouped_gemm(const std::vector<Index>& offsets, bool trans_b, Index n, Index k, const S* a,
                    const S* b, Index b_stride, S beta, S* c) const {
    using detail::packed_grouped_gemm;
    using onednn::Operands;
    if constexpr (std::is_same_v<S, float>) {
      if (gemm_ == Gemm::onednn_bf16) {  // row blocks of its own, no tile plan
        packed_grouped_gemm<Operands::in_bf16>(*this, offsets, trans_b, n, k, a, b, b_stride, beta,
                                               c);
        return;
      }
    }
    const bool decode = decode_size(offsets);
    if (!trans_b && decode && split_k_fits<S>(offsets.back(), n, k)) {
      grouped_gemm_split_k(offsets, n, k, a, b, b_stride, beta, c);
      return;
    }
    if constexpr (std::is_same_v<S, float>) {
      // Decode batches stay on the skinny kernel: packing weights for a few
      // rows would read them twice and write them once.
      if (gemm_ == Gemm::onednn_f32 && !decode) {
        packed_grouped_gemm<Operands::in_f32>(*this, offsets, trans_b, n, k, a, b, b_stride, beta,
                                              c);
        return;
      }
    }
    const detail::TilePlan plan(offsets, n, /*split_rows=*/true, kMinTiles, kTileRows,
                                kColumnAlign);
    check_blas_sizes(kTileRows, n, k, k, trans_b ? k : n, n);  // not inside the region
    const blas::SerialScope serial(dense_ == Gemm::blas);
    parallel_for_tiles(
        plan.items(),
        [&](Index i) {
          detail::Tile t;
          if (!plan.tile(i, t)) return;
          const S* bt = b + t.expert * b_stride + (trans_b ? t.col * k : t.col);
          product(false, trans_b, t.rows, t.cols, k, S(1), a + t.row * k, k, bt, trans_b ? k : n,
                  beta, c + t.row * n + t.col, n);
        },
        offsets.back() * n * k);
  }

  // grouped_gemm at decode sizes (every expert within the skinny kernel, B
  // stored (k, n), k > kSplitDepth, partial sums within kSplitScratchBytes;
  // not on the bf16 engine): each expert's sum over k is cut into parts of
  // kSplitDepth rows of B, one work item each, which streams a contiguous
  // block of the weights. Part 0 goes into C (with beta), the others into
  // scratch, added to C in part order after the loop, so the order of each
  // sum depends on the shapes only. Twice to four times as many items as
  // experts keep both threads busy when an odd number of experts is active
  // (T = 4 reads 5 or 7 of 8) or their row counts differ (T = 16); column
  // tiles would do it too, but reading part of every row of the weights
  // costs the prefetchers 15 to 30% of the bandwidth.
  template <class S>
  void grouped_gemm_split_k(const std::vector<Index>& offsets, Index n, Index k, const S* a,
                            const S* b, Index b_stride, S beta, S* c) const {
    const Index experts = static_cast<Index>(offsets.size()) - 1, rows = offsets.back();
    const Index parts = split_parts(k);
    std::vector<S>& scratch = split_k_scratch<S>();
    const auto size = static_cast<std::size_t>((parts - 1) * rows * n);
    if (scratch.size() < size) scratch.resize(size);  // grows only: no allocation per step
    S* partial = scratch.data();
    parallel_for_tiles(
        experts * parts,
        [&](Index i) {
          const Index e = i / parts, part = i % parts;
          const Index r0 = offsets[e], m = offsets[e + 1] - r0;
          if (m == 0) return;
          const Index p0 = part * kSplitDepth, depth = std::min(kSplitDepth, k - p0);
          const S* a_part = a + r0 * k + p0;
          const S* b_part = b + e * b_stride + p0 * n;
          if (part == 0) {
            product(false, false, m, n, depth, S(1), a_part, k, b_part, n, beta, c + r0 * n, n);
          } else {
            S* out = partial + ((part - 1) * rows + r0) * n;
            product(false, false, m, n, depth, S(1), a_part, k, b_part, n, S(0), out, n);
          }
        },
        rows * n * k);
    parallel_for(
        rows,
        [&](Index r) {
          for (Index part = 1; part < parts; ++part) {
            const S* from = partial + ((part - 1) * rows + r) * n;
            for (Index j = 0; j < n; ++j) c[r * n + j] += from[j];
          }
        },
        rows * n * parts);
  }

  static constexpr Index kSplitDepth = 256;
  // The most partial sums a split may keep (per calling thread, kept for its
  // next call): a decode batch of E8k2 needs 200 KiB. Larger products have
  // enough items to share without a split.
  static constexpr std::size_t kSplitScratchBytes = std::size_t{1} << 20;

  // For every expert e: W_e (k, n) += A_e^T (k, n_e) * B_e (n_e, n), with
  // W_e = w + e * w_stride: the weight gradient. Tiles split the columns of
  // W_e, never the rows of A_e (the sum), so each element's order is fixed.
  template <class S>
  void grouped_gemm_tn(const std::vector<Index>& offsets, Index k, Index n, const S* a, const S* b,
                       S* w, Index w_stride) const {
    const detail::TilePlan plan(offsets, n, /*split_rows=*/false, kMinWeightGradientTiles,
                                kTileRows, kColumnAlign);
    if constexpr (std::is_same_v<S, float>) {
      if (gemm_ == Gemm::onednn_bf16) {
        detail::bf16_grouped_gemm_tn(*this, plan, offsets, k, n, a, b, w, w_stride);
        return;
      }
    }
    check_blas_sizes(k, n, offsets.back(), k, n, n);  // not inside the region
    const blas::SerialScope serial(dense_ == Gemm::blas);
    parallel_for_tiles(
        plan.items(),
        [&](Index i) {
          detail::Tile t;
          if (!plan.tile(i, t)) return;
          product(true, false, k, t.cols, t.rows, S(1), a + t.row * k, k, b + t.row * n + t.col, n,
                  S(1), w + t.expert * w_stride + t.col, n);
        },
        offsets.back() * n * k);
  }

  // Tiling (detail::TilePlan): rows of an expert in near-equal tiles of at
  // most kTileRows (big enough that a BLAS amortises packing B, small enough
  // to balance the threads), then, while there are fewer than a minimum of
  // tiles, columns in near-equal tiles that are a multiple of kColumnAlign
  // wide.
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
  // Whether a loop of n items and `work` in total opens a parallel region.
  // A serial loop never does: libgomp allocates a fresh team for every
  // one-thread region.
  bool worth_a_team(Index n, Index work) const {
    return n > 1 && work >= kMinParallelWork && threads() > 1;
  }

  // The parts of kSplitDepth rows that grouped_gemm_split_k cuts k into.
  static Index split_parts(Index k) { return (k + kSplitDepth - 1) / kSplitDepth; }

  // Whether grouped_gemm_split_k applies to k, and its partial sums of
  // (rows, n) fit kSplitScratchBytes.
  template <class S>
  static bool split_k_fits(Index rows, Index n, Index k) {
    if (k <= kSplitDepth) return false;
    return static_cast<double>(split_parts(k) - 1) * static_cast<double>(rows) *
               static_cast<double>(n) * sizeof(S) <=
           static_cast<double>(kSplitScratchBytes);
  }

  // Whether every expert's rows fit the skinny kernel (a decode batch).
  static bool decode_size(const std::vector<Index>& offsets) {
    for (std::size_t e = 0; e + 1 < offsets.size(); ++e)
      if (offsets[e + 1] - offsets[e] > kSkinnyRows) return false;
    return true;
  }

  // The calling thread's partial sums for grouped_gemm_split_k (at most
  // kSplitScratchBytes): kept per thread, so that one backend serves
  // concurrent callers, and allocated once per thread.
  template <class S>
  static std::vector<S>& split_k_scratch() {
    thread_local std::vector<S> scratch;
    return scratch;
  }

  // Whether gemm() hands this product to the BLAS (not empty, not skinny).
  template <class S>
  bool runs_on_blas(bool trans_a, Index m, Index n, Index k) const {
    return blas::kHasGemm<S> && dense_ == Gemm::blas && m > 0 && n > 0 && k > 0 &&
           (trans_a || m > kSkinnyRows);
  }

  // gemm() on the calling thread, inside the caller's serial-BLAS scope: the
  // tiles of one grouped product share their caller's scope instead of
  // opening (and locking) one each. Sizes are checked by the caller.
  template <class S>
  void product(bool trans_a, bool trans_b, Index m, Index n, Index k, S alpha, const S* a,
               Index lda, const S* b, Index ldb, S beta, S* c, Index ldc) const {
    if (m == 0 || n == 0) return;
    if (k == 0) {
      detail::scale(m, n, beta, c, ldc);
      return;
    }
    if (!trans_a && m <= kSkinnyRows) {
      detail::skinny_gemm<static_cast<int>(kSkinnyRows)>(trans_b, m, n, k, alpha, a, lda, b, ldb,
                                                         beta, c, ldc);
      return;
    }
    if constexpr (blas::kHasGemm<S>) {  // compiled only where the BLAS has this type
      if (dense_ == Gemm::blas) {
        // An OpenMP OpenBLAS threads by this thread's ICV.
        [[maybe_unused]] detail::SerialOpenMP serial_icv;
        blas::gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
        return;
      }
    }
    detail::eigen_gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }

  // CBLAS takes int sizes. Checked before a parallel region: an exception
  // must not leave an OpenMP region (that would terminate the program).
  void check_blas_sizes(Index m, Index n, Index k, Index lda, Index ldb, Index ldc) const {
    if (dense_ != Gemm::blas) return;
    moe::detail::require(std::max({m, n, k, lda, ldb, ldc}) <= Index{INT_MAX},
                         "moe::cpu::Backend: a GEMM size or stride above INT_MAX (m=", m, ", n=", n,
                         ", k=", k, "), expected what a CBLAS can index");
  }

  static Gemm resolve(Gemm gemm) {
    moe::detail::require(
        gemm != Gemm::blas || blas::kAvailable,
        "moe::cpu::Backend: gemm=blas, expected automatic or eigen (this build has no "
        "CBLAS: configure with MOE_USE_BLAS=ON and a BLAS installed, e.g. Debian's "
        "libopenblas-dev)");
    const bool on_onednn = gemm == Gemm::onednn_bf16 || gemm == Gemm::onednn_f32;
    moe::detail::require(!on_onednn || onednn::kAvailable,
                         "moe::cpu::Backend: gemm=", to_string(gemm),
                         ", expected automatic, blas or eigen (this build has no oneDNN: link "
                         "the moe::onednn target, found with Debian's libdnnl-dev)");
#if !defined(_OPENMP)
    // oneDNN (Debian's: OpenMP) would thread each product by OMP_NUM_THREADS,
    // which a build without OpenMP cannot hold at 1: results would change.
    moe::detail::require(!on_onednn, "moe::cpu::Backend: gemm=", to_string(gemm),
                         ", expected automatic, blas or eigen (this build has no OpenMP: "
                         "configure with MOE_USE_OPENMP=ON)");
#endif
    moe::detail::require(!on_onednn || std::is_same_v<T, float>,
                         "moe::cpu::Backend: gemm=", to_string(gemm),
                         ", expected a Backend<float> (oneDNN's products sum in fp32; double "
                         "keeps its own precision)");
#if defined(MOE_HAVE_DNNL)
    if (gemm == Gemm::onednn_bf16) onednn::require_bf16_kernels();
    if (gemm == Gemm::onednn_f32) onednn::require_f32_kernels();
#endif
    return gemm == Gemm::automatic ? dense_engine(gemm) : gemm;
  }
  // The engine of the products that are not the experts': the BLAS when
  // the build has one, else Eigen (gemm itself when it is one of them).
  static Gemm dense_engine(Gemm gemm) {
    if (gemm == Gemm::blas || gemm == Gemm::eigen) return gemm;
    return blas::kAvailable ? Gemm::blas : Gemm::eigen;
  }

  int threads_ = 0;
  Gemm gemm_ = Gemm::eigen;   // the expert products' engine
  Gemm dense_ = Gemm::eigen;  // the other products' engine: blas or eigen
};

static_assert(BackendPolicy<Backend<float>>);
static_assert(BackendPolicy<Backend<double>>);

}  // namespace moe::cpu
