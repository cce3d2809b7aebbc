#pragma once
// The yardsticks of the MoE benchmarks, measured in the same process as the
// layer they judge: the machine's best dense GEMM (DenseReference) and its
// copy bandwidth (CopyBandwidth). See bench/README.md.

#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <memory_resource>
#include <thread>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(MOE_HAVE_CBLAS)
#include <cblas.h>
#endif

namespace bench {

using Index = std::ptrdiff_t;
using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using Clock = std::chrono::steady_clock;

inline int max_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

inline double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Fastest wall time of `reps` calls of f, after one untimed warm-up call
// (page faults, BLAS thread start-up). The fastest, not the median: a
// yardstick is the machine's best, and a run another process disturbed is
// slower, never faster, so the ratios against it are lower bounds.
template <class F>
double best_seconds(F&& f, int reps) {
  f();
  double best = 0;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = Clock::now();
    f();
    const double s = seconds_since(t0);
    best = r == 0 ? s : std::min(best, s);
  }
  return best;
}

// U(-1, 1) from a xorshift generator: GEMM speed does not depend on the
// values (none is denormal), and std::rand would take seconds on the largest
// matrices.
inline void fill_random(RowMat& m, std::uint64_t seed) {
  std::uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (Index i = 0; i < m.size(); ++i) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    m.data()[i] = static_cast<float>(s >> 40) * (2.0f / 16777216.0f) - 1.0f;
  }
}

// ---------------------------------------------------------------------------
// The dense GEMM: cblas_sgemm when the library was built with a CBLAS,
// threaded by the BLAS itself; Eigen's own threaded GEMM otherwise.

// Row-major C (m, n) = op(A) op(B) + beta C, beta 0 or 1, on all threads.
inline void dense_gemm(bool trans_a, bool trans_b, Index m, Index n, Index k, const float* a,
                       const float* b, float beta, float* c) {
#if defined(MOE_HAVE_CBLAS)
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
              trans_b ? CblasTrans : CblasNoTrans, static_cast<int>(m), static_cast<int>(n),
              static_cast<int>(k), 1.0f, a, static_cast<int>(trans_a ? m : k), b,
              static_cast<int>(trans_b ? k : n), beta, c, static_cast<int>(n));
#else
  using Map = Eigen::Map<const RowMat>;
  const Map A(a, trans_a ? k : m, trans_a ? m : k), B(b, trans_b ? n : k, trans_b ? k : n);
  Eigen::Map<RowMat> C(c, m, n);
  auto store = [&](const auto& product) {
    if (beta == 0.0f) {
      C.noalias() = product;
    } else {
      C.noalias() += product;
    }
  };
  if (!trans_a && !trans_b) store(A * B);
  if (!trans_a && trans_b) store(A * B.transpose());
  if (trans_a && !trans_b) store(A.transpose() * B);
  if (trans_a && trans_b) store(A.transpose() * B.transpose());
#endif
}

inline const char* dense_gemm_name() {
#if defined(MOE_HAVE_CBLAS)
  return "cblas_sgemm (row-major), threaded by the BLAS";
#else
  return "Eigen GEMM, threaded by Eigen (OpenMP)";
#endif
}

// OpenBLAS has its own thread pool. For the dense reference it gets as many
// threads as OpenMP has; the previous count comes back afterwards, so the
// library's own BLAS calls run with whatever it chose.
class DenseThreads {
 public:
#if defined(MOE_HAVE_OPENBLAS)
  DenseThreads() : saved_(openblas_get_num_threads()) { openblas_set_num_threads(max_threads()); }
  ~DenseThreads() { openblas_set_num_threads(saved_); }
#else
  DenseThreads() = default;
#endif
  DenseThreads(const DenseThreads&) = delete;
  DenseThreads& operator=(const DenseThreads&) = delete;

 private:
#if defined(MOE_HAVE_OPENBLAS)
  int saved_;
#endif
};

// pthread OpenBLAS's worker threads busy-wait after a threaded call (about
// 2^28 cycles, ~0.1 s here) before they sleep. A loop timed right after the
// dense reference would share its cores with them, so wait them out.
inline void let_blas_threads_sleep() {
#if defined(MOE_HAVE_CBLAS)
  std::this_thread::sleep_for(std::chrono::milliseconds(150));
#endif
}

// The dense FFN with the same active FLOPs as a MoE layer: T tokens through
// one FFN of hidden width H = (expert rows / T) d_ff, e.g. k d_ff for top-k
// (the dense layer of the same active parameters per token), in single large
// GEMMs with no routing (w = 2 for SwiGLU's [W1 | W3]):
//   forward : PRE (T, w H) = X W1;  Y (T, d) = Hid W2
//   backward: dHid = dY W2^T;  dW2 += Hid^T dY;  dW1 += X^T dPRE;  dX = dPRE W1^T
// No activation: Hid and dPRE are fixed random inputs; only GEMMs are timed.
class DenseReference {
 public:
  DenseReference(Index tokens, Index d_model, Index hidden, Index w, bool backward)
      : tokens_(tokens), d_(d_model), h_(hidden), wide_(w * hidden), backward_(backward) {
    x_.resize(tokens_, d_);
    w1_.resize(d_, wide_);
    pre_.resize(tokens_, wide_);
    hidden_.resize(tokens_, h_);
    w2_.resize(h_, d_);
    y_.resize(tokens_, d_);
    fill_random(x_, 1);
    fill_random(w1_, 2);
    fill_random(hidden_, 3);
    fill_random(w2_, 4);
    if (backward_) {
      dy_.resize(tokens_, d_);
      d_hidden_.resize(tokens_, h_);
      d_pre_.resize(tokens_, wide_);
      dw1_ = RowMat::Zero(d_, wide_);
      dw2_ = RowMat::Zero(h_, d_);
      dx_.resize(tokens_, d_);
      fill_random(dy_, 5);
      fill_random(d_pre_, 6);
    }
  }

  // FLOPs of one run(): 2 per multiply-add; the backward is twice the forward.
  double flops() const {
    const double forward = 2.0 * static_cast<double>(tokens_) * static_cast<double>(d_) *
                           static_cast<double>(wide_ + h_);
    return (backward_ ? 3.0 : 1.0) * forward;
  }

  void run() {
    dense_gemm(false, false, tokens_, wide_, d_, x_.data(), w1_.data(), 0, pre_.data());
    dense_gemm(false, false, tokens_, d_, h_, hidden_.data(), w2_.data(), 0, y_.data());
    if (backward_) {
      dense_gemm(false, true, tokens_, h_, d_, dy_.data(), w2_.data(), 0, d_hidden_.data());
      dense_gemm(true, false, h_, d_, tokens_, hidden_.data(), dy_.data(), 1, dw2_.data());
      dense_gemm(true, false, d_, wide_, tokens_, x_.data(), d_pre_.data(), 1, dw1_.data());
      dense_gemm(false, true, tokens_, d_, wide_, d_pre_.data(), w1_.data(), 0, dx_.data());
    }
  }

  // Fastest seconds of one run() over `reps`, on all threads; returns once
  // the BLAS threads have gone to sleep.
  double best_seconds(int reps) {
    double s = 0;
    {
      [[maybe_unused]] DenseThreads threads;
      s = bench::best_seconds([this] { run(); }, reps);
    }
    let_blas_threads_sleep();
    return s;
  }

 private:
  Index tokens_, d_, h_, wide_;
  bool backward_;
  RowMat x_, w1_, pre_, hidden_, w2_, y_;
  RowMat dy_, d_hidden_, d_pre_, dw1_, dw2_, dx_;
};

// ---------------------------------------------------------------------------
// Copy bandwidth: each OpenMP thread memcpy's its own contiguous slice of a
// buffer far larger than the last-level cache (its pages first touched by
// the same thread). Bytes moved = bytes read + bytes written (STREAM's Copy
// convention), the bound for a kernel that streams weights from DRAM.
// The buffers come from `memory`: by default plain operator new (4 KiB pages
// here), or the CPU backend's resource (huge pages, as the layer's weights).
class CopyBandwidth {
 public:
  explicit CopyBandwidth(std::size_t bytes,
                         std::pmr::memory_resource* memory = std::pmr::new_delete_resource())
      : bytes_(bytes), src_(bytes, memory), dst_(bytes, memory) {
    for_each_slice([this](std::size_t begin, std::size_t size) {
      std::memset(src_.get() + begin, 1, size);
      std::memset(dst_.get() + begin, 0, size);
    });
  }

  std::size_t bytes() const { return bytes_; }
  double bytes_moved() const { return 2.0 * static_cast<double>(bytes_); }

  void run() {
    for_each_slice([this](std::size_t begin, std::size_t size) {
      std::memcpy(dst_.get() + begin, src_.get() + begin, size);
    });
  }

  // GB/s (1e9 bytes) of the fastest of `reps` copies.
  double best_gbps(int reps) {
    return bytes_moved() / bench::best_seconds([this] { run(); }, reps) / 1e9;
  }

 private:
  // f(begin, size) on thread i of n for the i-th of n page-aligned slices.
  template <class F>
  void for_each_slice(F&& f) {
#if defined(_OPENMP)
#pragma omp parallel
#endif
    {
#if defined(_OPENMP)
      const std::size_t i = static_cast<std::size_t>(omp_get_thread_num());
      const std::size_t n = static_cast<std::size_t>(omp_get_num_threads());
#else
      const std::size_t i = 0, n = 1;
#endif
      constexpr std::size_t kPage = 4096;
      const std::size_t pages = (bytes_ + kPage - 1) / kPage;
      const std::size_t begin = std::min(bytes_, pages * i / n * kPage);
      const std::size_t end = std::min(bytes_, pages * (i + 1) / n * kPage);
      if (end > begin) f(begin, end - begin);
    }
  }

  // bytes from a memory resource, given back on destruction.
  class Block {
   public:
    Block(std::size_t bytes, std::pmr::memory_resource* memory)
        : bytes_(bytes), memory_(memory), data_(static_cast<char*>(memory->allocate(bytes))) {}
    ~Block() { memory_->deallocate(data_, bytes_); }
    Block(const Block&) = delete;
    Block& operator=(const Block&) = delete;
    char* get() { return data_; }

   private:
    std::size_t bytes_;
    std::pmr::memory_resource* memory_;
    char* data_;
  };

  std::size_t bytes_;
  Block src_, dst_;
};

}  // namespace bench
