#pragma once
// The CPU backend's link to a CBLAS (OpenBLAS on Debian): which GEMM engine
// runs, a typed row-major GEMM, and a scope that keeps the BLAS on the
// calling thread.
//
// MOE_HAVE_CBLAS is a usage requirement of the moe::moe CMake target when
// MOE_USE_BLAS found a CBLAS (MOE_HAVE_OPENBLAS when it is OpenBLAS); without
// it every product runs on Eigen's own GEMM.

#include <mutex>
#include <string>
#include <type_traits>

#include "moe/core/routing.hpp"

#if defined(MOE_HAVE_CBLAS)
#include <cblas.h>
#endif

namespace moe::cpu {

// The engine of the expert GEMMs. automatic: the BLAS when the build has one,
// Eigen otherwise. onednn_bf16: the expert GEMMs (the grouped products) with
// their operands rounded to bfloat16 and fp32 sums, on oneDNN (see
// moe/backend/cpu/onednn.hpp); the layer's other products stay in fp32 on
// the BLAS or Eigen. onednn_f32: the products with the weights in fp32 on
// oneDNN, each expert's weights packed once per call into the kernel's
// layout; the weight gradients and the other products on the BLAS or
// Eigen. An engine the build lacks is an error (Backend's constructor says
// so).
enum class Gemm { automatic, blas, eigen, onednn_bf16, onednn_f32 };

inline const char* to_string(Gemm gemm) {
  switch (gemm) {
    case Gemm::automatic:
      return "automatic";
    case Gemm::blas:
      return "blas";
    case Gemm::eigen:
      return "eigen";
    case Gemm::onednn_bf16:
      return "onednn_bf16";
    case Gemm::onednn_f32:
      return "onednn_f32";
  }
  return "unknown";
}

namespace blas {

#if defined(MOE_HAVE_CBLAS)
inline constexpr bool kAvailable = true;
#else
inline constexpr bool kAvailable = false;
#endif

// The scalar types the CBLAS has a GEMM for.
template <class S>
inline constexpr bool kHasGemm = kAvailable &&
                                 (std::is_same_v<S, float> || std::is_same_v<S, double>);

// Row-major C(m, n) = alpha op(A) op(B) + beta C through cblas_?gemm; m, n,
// k >= 1 (the caller handles empty products, which BLASes treat unevenly).
template <class S>
void gemm(bool trans_a, bool trans_b, Index m, Index n, Index k, S alpha, const S* a, Index lda,
          const S* b, Index ldb, S beta, S* c, Index ldc) {
  static_assert(kHasGemm<S>, "moe::cpu::blas::gemm: no CBLAS GEMM for this scalar type");
#if defined(MOE_HAVE_CBLAS)
  const auto ta = trans_a ? CblasTrans : CblasNoTrans;
  const auto tb = trans_b ? CblasTrans : CblasNoTrans;
  // CBLAS takes int sizes (the caller's tiles are far below INT_MAX).
  const auto i = [](Index v) { return static_cast<int>(v); };
  if constexpr (std::is_same_v<S, float>) {
    cblas_sgemm(CblasRowMajor, ta, tb, i(m), i(n), i(k), alpha, a, i(lda), b, i(ldb), beta, c,
                i(ldc));
  } else {
    cblas_dgemm(CblasRowMajor, ta, tb, i(m), i(n), i(k), alpha, a, i(lda), b, i(ldb), beta, c,
                i(ldc));
  }
#else
  (void)trans_a, (void)trans_b, (void)m, (void)n, (void)k, (void)alpha, (void)a, (void)lda;
  (void)b, (void)ldb, (void)beta, (void)c, (void)ldc;
#endif
}

// For its lifetime, OpenBLAS runs every GEMM on the thread that calls it.
// The backend splits work over its own OpenMP threads in tiles that do not
// depend on the thread count, so a BLAS that threaded each tile again would
// oversubscribe the cores and change nothing but the speed.
// - pthread OpenBLAS: its thread count is process-wide. The first scope to
//   open (in any thread) saves it and sets it to 1; the last to close
//   restores it. So scopes of several threads at once (one layer serving
//   several callers) and nested scopes keep OpenBLAS serial until all have
//   closed, and the user's setting comes back afterwards. Another thread
//   calling OpenBLAS meanwhile also runs serially.
// - OpenMP OpenBLAS: nothing to do here. It is serial inside a parallel
//   region, and its thread count is the caller's OpenMP ICV, which Backend
//   sets per thread around a product (setting it here would also change the
//   ICV of the thread that opens the region).
// - Other BLASes are expected to be serial (netlib) or set to one thread by
//   the user.
class SerialScope {
 public:
  // active = false: a no-op (the Eigen engine needs no scope).
  explicit SerialScope(bool active = true) {
#if defined(MOE_HAVE_OPENBLAS)
    if (!active || openblas_get_parallel() != 1) return;  // 1: pthreads
    Shared& shared = state();
    const std::lock_guard<std::mutex> lock(shared.mutex);
    if (shared.open++ == 0) {
      shared.saved = openblas_get_num_threads();
      if (shared.saved != 1) openblas_set_num_threads(1);
    }
    active_ = true;
#else
    (void)active;
#endif
  }
  ~SerialScope() {
#if defined(MOE_HAVE_OPENBLAS)
    if (!active_) return;
    Shared& shared = state();
    const std::lock_guard<std::mutex> lock(shared.mutex);
    if (--shared.open == 0 && shared.saved != 1) openblas_set_num_threads(shared.saved);
#endif
  }
  SerialScope(const SerialScope&) = delete;
  SerialScope& operator=(const SerialScope&) = delete;

 private:
  // The scopes open in this process and the thread count they restore.
  struct Shared {
    std::mutex mutex;
    int open = 0;
    int saved = 1;
  };
  static Shared& state() {
    static Shared shared;
    return shared;
  }
  [[maybe_unused]] bool active_ = false;
};

}  // namespace blas

// What the build links, for logs and benchmark reports, e.g.
// "OpenBLAS 0.3.21 DYNAMIC_ARCH NO_AFFINITY Cooperlake MAX_THREADS=64,
// core=Cooperlake, parallel=pthread", "CBLAS (not OpenBLAS)" or "none".
inline std::string blas_info() {
#if defined(MOE_HAVE_OPENBLAS)
  const int parallel = openblas_get_parallel();
  const char* mode = parallel == 0 ? "serial" : parallel == 1 ? "pthread" : "openmp";
  std::string info = openblas_get_config();
  while (!info.empty() && info.back() == ' ') info.pop_back();
  return info + ", core=" + openblas_get_corename() + ", parallel=" + mode;
#elif defined(MOE_HAVE_CBLAS)
  return "CBLAS (not OpenBLAS)";
#else
  return "none";
#endif
}

}  // namespace moe::cpu
