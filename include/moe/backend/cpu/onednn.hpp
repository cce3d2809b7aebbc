#pragma once
// The CPU backend's bf16 engine (Gemm::onednn_bf16): products with both
// operands rounded to bfloat16 and the sum kept in fp32, run by oneDNN's
// matmul (on AMX or AVX512-BF16 where the CPU has them, emulated otherwise).
//
// MOE_HAVE_DNNL is a usage requirement of the moe::onednn CMake target (found
// with Debian's libdnnl-dev); without it kAvailable is false and Backend
// refuses the engine.
//
// One primitive serves every size: M, N and K are runtime dimensions, and
// the strides, transposes and beta are fixed per primitive. The few
// primitives a layer needs are built once per process and shared by every
// thread (oneDNN primitives are safe to execute concurrently). Each call
// runs on the calling thread: oneDNN's OpenMP runtime is serial inside the
// backend's parallel region, and SerialOpenMP keeps it serial outside one,
// so each product sums in a fixed order whatever the thread count.

#include <Eigen/Core>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include "moe/core/config.hpp"
#include "moe/core/error.hpp"

#if defined(MOE_HAVE_DNNL)
#include <oneapi/dnnl/dnnl.hpp>
#endif

namespace moe::cpu::onednn {

#if defined(MOE_HAVE_DNNL)
inline constexpr bool kAvailable = true;
#else
inline constexpr bool kAvailable = false;
#endif

using bf16 = Eigen::bfloat16;

// dst[i] = src[i] rounded to the nearest bfloat16 (ties to even).
inline void to_bf16(const float* src, Index n, bf16* dst) {
  Eigen::Map<Eigen::Array<bf16, Eigen::Dynamic, 1>>(dst, n) =
      Eigen::Map<const Eigen::ArrayXf>(src, n).cast<bf16>();
}

// A calling thread's bf16 copies of a product's operands. They only grow,
// so steady-state steps reuse them; each thread that calls the backend has
// its own, so one backend serves concurrent callers.
struct Workspace {
  std::vector<bf16> a, b;
  static Workspace& of_this_thread() {
    thread_local Workspace workspace;
    return workspace;
  }
};

#if defined(MOE_HAVE_DNNL)

// Row-major C (m, n) = op(A) op(B) + beta C with A, B in bf16 and C in fp32:
// a matmul for given transposes, row strides and beta, any m, n, k >= 1.
class Bf16Matmul {
 public:
  // The process's primitive for this layout, built on first use. Call it
  // outside a parallel region: it throws moe::Error if oneDNN cannot build
  // one.
  static const Bf16Matmul& get(bool trans_a, bool trans_b, Index lda, Index ldb, Index ldc,
                               float beta) {
    static std::mutex mutex;
    static std::map<std::tuple<bool, bool, Index, Index, Index, float>, Bf16Matmul> built;
    const std::lock_guard<std::mutex> lock(mutex);
    const auto key = std::make_tuple(trans_a, trans_b, lda, ldb, ldc, beta);
    auto found = built.find(key);
    if (found == built.end())
      found = built.emplace(key, Bf16Matmul(trans_a, trans_b, lda, ldb, ldc, beta)).first;
    return found->second;
  }

  // On the calling thread. a, b and c must follow the layout given to get().
  void run(Index m, Index n, Index k, const bf16* a, const bf16* b, float* c) const {
    using dnnl::memory;
    const dnnl::engine& cpu = engine();
    thread_local dnnl::stream stream(cpu);
    const memory src({{m, k}, memory::data_type::bf16, strides(trans_a_, lda_)}, cpu,
                     const_cast<bf16*>(a));
    const memory weights({{k, n}, memory::data_type::bf16, strides(trans_b_, ldb_)}, cpu,
                         const_cast<bf16*>(b));
    const memory dst({{m, n}, memory::data_type::f32, strides(false, ldc_)}, cpu, c);
    primitive_.execute(stream,
                       {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_DST, dst}});
  }

 private:
  Bf16Matmul(bool trans_a, bool trans_b, Index lda, Index ldb, Index ldc, float beta)
      : trans_a_(trans_a), trans_b_(trans_b), lda_(lda), ldb_(ldb), ldc_(ldc) {
    using dnnl::memory;
    constexpr auto any = DNNL_RUNTIME_DIM_VAL;
    const memory::desc src({any, any}, memory::data_type::bf16, strides(trans_a, lda));
    const memory::desc weights({any, any}, memory::data_type::bf16, strides(trans_b, ldb));
    const memory::desc dst({any, any}, memory::data_type::f32, strides(false, ldc));
    dnnl::primitive_attr attr;
    if (beta != 0) {  // C = A B + beta C: oneDNN's sum post-op
      dnnl::post_ops ops;
      ops.append_sum(beta);
      attr.set_post_ops(ops);
    }
    try {
      primitive_ = dnnl::matmul(
          dnnl::matmul::primitive_desc(dnnl::matmul::desc(src, weights, dst), attr, engine()));
    } catch (const dnnl::error& e) {
      throw Error(moe::detail::concat(
          "moe::cpu::Backend: gemm=onednn_bf16, oneDNN built no bf16 matmul (", e.what(), ")"));
    }
  }

  // A row-major matrix with row stride ld; transposed: read as its transpose.
  static dnnl::memory::dims strides(bool transposed, Index ld) {
    return transposed ? dnnl::memory::dims{1, ld} : dnnl::memory::dims{ld, 1};
  }
  static const dnnl::engine& engine() {
    static const dnnl::engine cpu(dnnl::engine::kind::cpu, 0);
    return cpu;
  }

  bool trans_a_, trans_b_;
  Index lda_, ldb_, ldc_;
  dnnl::matmul primitive_;
};

#endif

}  // namespace moe::cpu::onednn
