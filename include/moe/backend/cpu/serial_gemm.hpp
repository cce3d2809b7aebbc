#pragma once
// The CPU backend's products on the calling thread: a kernel for few rows
// (decode batches, small experts) that reads B once, Eigen's GEMM kept
// serial, and C = beta C for empty sums. The backend splits work into tiles
// and runs each tile through one of these (or a serial BLAS).

#include <Eigen/Core>
#include <algorithm>
#include <utility>

#include "moe/core/config.hpp"

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

namespace detail {

// A hint that *p will be read soon, into L2 (a no-op where the compiler has
// no prefetch builtin).
inline void prefetch_to_l2(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p, /*rw=*/0, /*locality=*/2);
#else
  (void)p;
#endif
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

// C = beta C (the product of an empty sum).
template <class S>
void scale(Index m, Index n, S beta, S* c, Index ldc) {
  if (beta == S(1)) return;
  for (Index i = 0; i < m; ++i)
    for (Index j = 0; j < n; ++j) c[i * ldc + j] = beta == S(0) ? S(0) : beta * c[i * ldc + j];
}

inline constexpr Index kSkinnyDepth = 16;
// How far ahead (rows of B) skinny_rows asks for B: one chunk.
inline constexpr Index kSkinnyPrefetch = kSkinnyDepth;

// Columns [j0, j0 + P packets) of C (M, n) += alpha A (M, p0:p1) B (p0:p1, n):
// the M x P accumulators stay in SIMD registers over the rows p0..p1 of B.
// (A function, not a lambda: GCC keeps a lambda's accumulators on the stack.)
template <int M, int P, class S>
void skinny_block(Index j0, Index p0, Index p1, Index k, S alpha, const S* a, Index lda, const S* b,
                  Index ldb, S* c, Index ldc) {
  namespace ei = Eigen::internal;
  using Packet = typename ei::packet_traits<S>::type;
  constexpr Index kLanes = ei::packet_traits<S>::size;
  Packet acc[M][P];
  for (int i = 0; i < M; ++i)
    for (int v = 0; v < P; ++v) acc[i][v] = ei::ploadu<Packet>(c + i * ldc + j0 + v * kLanes);
  for (Index p = p0; p < p1; ++p) {
    const S* bp = b + p * ldb + j0;
    // Past the last row of B, the hint falls on this row (no branch here:
    // with one, GCC no longer keeps acc in registers).
    const S* ahead = p + kSkinnyPrefetch < k ? bp + kSkinnyPrefetch * ldb : bp;
    for (int v = 0; v < P; ++v) prefetch_to_l2(ahead + v * kLanes);
    Packet bv[P];
    for (int v = 0; v < P; ++v) bv[v] = ei::ploadu<Packet>(bp + v * kLanes);
    for (int i = 0; i < M; ++i) {
      const Packet ai = ei::pset1<Packet>(alpha * a[i * lda + p]);
      for (int v = 0; v < P; ++v) acc[i][v] = ei::pmadd(ai, bv[v], acc[i][v]);
    }
  }
  for (int i = 0; i < M; ++i)
    for (int v = 0; v < P; ++v) ei::pstoreu(c + i * ldc + j0 + v * kLanes, acc[i][v]);
}

// C (M, n) += alpha A (M, k) B (k, n), M small, in chunks of kSkinnyDepth
// rows of B. Inside a chunk, each block of columns keeps its M x block
// accumulators in SIMD registers across the chunk, so C is read and written
// once per chunk, not once per row of B; the column blocks walk the chunk's
// 16 rows of B left to right (16 contiguous streams the prefetcher follows).
// Each element still sums over p in order.
//
// B comes from DRAM at decode sizes, and each chunk starts 16 new pages the
// hardware prefetcher has not seen: each block therefore asks for the same
// columns one chunk ahead (into L2). Without it, M = 4..8 read B from DRAM
// at 60 to 75% of the rate of M = 1.
template <int M, class S>
void skinny_rows(Index n, Index k, S alpha, const S* a, Index lda, const S* b, Index ldb, S* c,
                 Index ldc) {
  constexpr Index kLanes = Eigen::internal::packet_traits<S>::size;
  // Packets per row so that M rows of accumulators, one row of B and the
  // broadcast fit the vector registers (16 for SSE/AVX2, 32 for AVX-512).
  constexpr int kPackets = std::clamp((kVectorRegisters - 1) / (M + 1), 1, 4);
  for (Index p0 = 0; p0 < k; p0 += kSkinnyDepth) {
    const Index p1 = std::min(k, p0 + kSkinnyDepth);
    Index j0 = 0;
    for (; j0 + kPackets * kLanes <= n; j0 += kPackets * kLanes)
      skinny_block<M, kPackets>(j0, p0, p1, k, alpha, a, lda, b, ldb, c, ldc);
    for (; j0 + kLanes <= n; j0 += kLanes)  // then one packet at a time
      skinny_block<M, 1>(j0, p0, p1, k, alpha, a, lda, b, ldb, c, ldc);
    for (; j0 < n; ++j0)  // the last columns, one at a time, in the same order
      for (Index p = p0; p < p1; ++p)
        for (int i = 0; i < M; ++i)
          c[i * ldc + j0] =
              Eigen::internal::pmadd(alpha * a[i * lda + p], b[p * ldb + j0], c[i * ldc + j0]);
  }
}

// Few rows (m <= MaxRows): stream B once, each element of B used for every
// row of A while it is in registers (skinny_rows) or L1 (the dot products
// for trans_b).
template <int MaxRows, class S>
void skinny_gemm(bool trans_b, Index m, Index n, Index k, S alpha, const S* a, Index lda,
                 const S* b, Index ldb, S beta, S* c, Index ldc) {
  using ConstRowMap = Eigen::Map<const Eigen::Matrix<S, 1, Eigen::Dynamic>>;
  scale(m, n, beta, c, ldc);
  if (!trans_b) {
    // The row count as a compile-time constant (accumulators in registers):
    // the one M in 1..MaxRows that equals m.
    const auto run_rows = [&]<int... M>(std::integer_sequence<int, M...>) {
      (void)((m == M + 1 && (skinny_rows<M + 1>(n, k, alpha, a, lda, b, ldb, c, ldc), true)) ||
             ...);
    };
    run_rows(std::make_integer_sequence<int, MaxRows>{});
  } else {
    // C_ij += alpha <A_i, B_j>: B's rows are read once, A's stay cached.
    for (Index j = 0; j < n; ++j) {
      const ConstRowMap bj(b + j * ldb, k);
      for (Index i = 0; i < m; ++i) c[i * ldc + j] += alpha * ConstRowMap(a + i * lda, k).dot(bj);
    }
  }
}

// Eigen's GEMM on this thread. Eigen threads a large product unless the
// calling thread's OpenMP team is larger than one or its nthreads ICV is 1,
// and it sizes its blocking (so the order of the sums) by the thread count.
// Setting this thread's ICV to 1 for the product keeps it on Eigen's serial
// path; the ICV is per thread. (A process-wide Eigen::setNbThreads(n > 1)
// overrides it: leave it unset for determinism.)
template <class S>
void eigen_gemm(bool trans_a, bool trans_b, Index m, Index n, Index k, S alpha, const S* a,
                Index lda, const S* b, Index ldb, S beta, S* c, Index ldc) {
  using Mat = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Stride = Eigen::OuterStride<>;
  Eigen::Map<Mat, 0, Stride> C(c, m, n, Stride(ldc));
  [[maybe_unused]] SerialOpenMP serial;
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

}  // namespace detail
}  // namespace moe::cpu
