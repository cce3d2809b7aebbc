#pragma once
// The CPU backend's oneDNN engines: Gemm::onednn_bf16 (products with both
// operands rounded to bfloat16 and the sum kept in fp32) and
// Gemm::onednn_f32 (fp32 operands, the weights packed once per call), on
// oneDNN's matmul (moe/backend/cpu/bf16_products.hpp uses these pieces).
//
// MOE_HAVE_DNNL is a usage requirement of the moe::onednn CMake target (found
// with Debian's libdnnl-dev); without it kAvailable is false and Backend
// refuses the engine.
//
// Two kinds of product:
// - PackedMatmul: a fixed block of rows times weights packed once into the
//   kernel's own layout (oneDNN's brgemm: AMX on CPUs that have it), with
//   bf16 or f32 operands (Gemm::onednn_f32 uses only this one).
// - Bf16Matmul: any M, N and K (runtime sizes) on operands as stored
//   (oneDNN's gemm:jit, which packs per call): the weight gradients.
// The primitives a layer needs are built once per process, under a serial
// OpenMP setting, and shared by every thread (oneDNN primitives are safe to
// execute concurrently). Each call runs on the calling thread with the
// OpenMP setting at 1 (SerialOpenMP): oneDNN sizes its K split by that
// setting, so this keeps each product's order of sums fixed whatever the
// thread count.

#include <Eigen/Core>
#include <algorithm>
#include <bit>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include "moe/backend/cpu/serial_gemm.hpp"
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

// Rows per block of the packed products and of the rounding reorders.
inline constexpr Index kBlockRows = 64;

// The type both operands of a packed product have in the kernel: bf16
// (rounded; Gemm::onednn_bf16) or f32 (as given; Gemm::onednn_f32). Sums
// are fp32 either way.
enum class Operands { in_bf16, in_f32 };

// How an error names the engine of a product on operands of this type, as
// the backend's other errors do ("moe::cpu::Backend: gemm=..., ...").
inline const char* engine_of(Operands type) {
  return type == Operands::in_bf16 ? "moe::cpu::Backend: gemm=onednn_bf16"
                                   : "moe::cpu::Backend: gemm=onednn_f32";
}

// dst[i] = src[i] rounded to the nearest bfloat16 (ties to even).
inline void to_bf16(const float* src, Index n, bf16* dst) {
  Eigen::Map<Eigen::Array<bf16, Eigen::Dynamic, 1>>(dst, n) =
      Eigen::Map<const Eigen::ArrayXf>(src, n).cast<bf16>();
}

// A 64-byte line: oneDNN's packed weights and scratchpads start on one.
struct alignas(64) Line {
  unsigned char bytes[64];
};

// The lines that hold `bytes`.
inline Index lines(std::size_t bytes) { return static_cast<Index>((bytes + 63) / 64); }

// A calling thread's bf16 copies of a product's operands, packed weights,
// per-team-thread scratch and row offsets. They only grow, so steady-state
// steps reuse them; each thread that calls the backend has its own, so one
// backend serves concurrent callers.
struct Workspace {
  std::vector<bf16> a, b;
  std::vector<Line> packed, scratch;
  std::vector<Index> block_offsets;
  static Workspace& of_this_thread() {
    thread_local Workspace workspace;
    return workspace;
  }
};

#if defined(MOE_HAVE_DNNL)

// The process's object for key, built by make() on first use with OpenMP
// serial (oneDNN fixes a primitive's threading when it builds it), for the
// engine of operands of `type`. Never destroyed, so no order of static
// destruction matters. Call it outside a parallel region: make() may throw.
template <class Value, class Key, class Make>
const Value& built_once(const Key& key, Operands type, Make&& make) {
  static auto* const mutex = new std::mutex;
  static auto* const built = new std::map<Key, Value>;
  const std::lock_guard<std::mutex> lock(*mutex);
  auto found = built->find(key);
  if (found == built->end()) {
    [[maybe_unused]] const detail::SerialOpenMP serial;
    try {
      found = built->emplace(key, make()).first;
    } catch (const dnnl::error& e) {
      throw Error(moe::detail::concat(
          engine_of(type), ", oneDNN built no primitive on this CPU (", e.what(),
          type == Operands::in_bf16 ? "; oneDNN's bf16 kernels need AVX-512)" : ")"));
    }
  }
  return found->second;
}

// Attributes for a primitive that runs on several threads at once: oneDNN
// 2.6 (built without concurrent scratchpads) allows that only for
// primitives whose scratchpad is the caller's.
inline dnnl::primitive_attr user_scratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}
// pd, checked to need no scratchpad (the callers pass none).
template <class PrimitiveDesc>
PrimitiveDesc without_scratchpad(PrimitiveDesc pd, Operands type) {
  moe::detail::require(pd.scratchpad_desc().get_size() == 0, engine_of(type), ", oneDNN's ",
                       pd.impl_info_str(), " asks for a scratchpad, expected none");
  return pd;
}

// Attributes of a matmul C = A B + beta C: the caller's scratchpad, and
// oneDNN's sum post-op when beta is not 0.
inline dnnl::primitive_attr matmul_attributes(float beta) {
  dnnl::primitive_attr attr = user_scratchpad();
  if (beta != 0) {
    dnnl::post_ops ops;
    ops.append_sum(beta);
    attr.set_post_ops(ops);
  }
  return attr;
}

// The process's CPU engine (never destroyed), and this thread's stream on it.
inline const dnnl::engine& cpu_engine() {
  static const auto* const cpu = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *cpu;
}
inline dnnl::stream& this_thread_stream() {
  thread_local dnnl::stream stream(cpu_engine());
  return stream;
}

// beta as a map key: its bits (a NaN has no order).
inline std::uint32_t bits(float beta) { return std::bit_cast<std::uint32_t>(beta); }

// Row-major C (m, n) = op(A) op(B) + beta C with A, B in bf16 and C in fp32:
// a matmul for given transposes, row strides and beta, any m, n, k >= 1.
class Bf16Matmul {
 public:
  // The process's primitive for this layout, built on first use. Call it
  // outside a parallel region: it throws moe::Error if oneDNN cannot build
  // one.
  static const Bf16Matmul& get(bool trans_a, bool trans_b, Index lda, Index ldb, Index ldc,
                               float beta) {
    const auto key = std::tuple(trans_a, trans_b, lda, ldb, ldc, bits(beta));
    return built_once<Bf16Matmul>(
        key, Operands::in_bf16, [&] { return Bf16Matmul(trans_a, trans_b, lda, ldb, ldc, beta); });
  }

  // On the calling thread. a, b and c must follow the layout given to get().
  void run(Index m, Index n, Index k, const bf16* a, const bf16* b, float* c) const {
    using dnnl::memory;
    const dnnl::engine& cpu = cpu_engine();
    const memory src({{m, k}, memory::data_type::bf16, strides(trans_a_, lda_)}, cpu,
                     const_cast<bf16*>(a));
    const memory weights({{k, n}, memory::data_type::bf16, strides(trans_b_, ldb_)}, cpu,
                         const_cast<bf16*>(b));
    const memory dst({{m, n}, memory::data_type::f32, strides(false, ldc_)}, cpu, c);
    primitive_.execute(this_thread_stream(),
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
    primitive_ = dnnl::matmul(
        without_scratchpad(dnnl::matmul::primitive_desc(dnnl::matmul::desc(src, weights, dst),
                                                        matmul_attributes(beta), cpu_engine()),
                           Operands::in_bf16));
  }

  // A row-major matrix with row stride ld; transposed: read as its transpose.
  static dnnl::memory::dims strides(bool transposed, Index ld) {
    return transposed ? dnnl::memory::dims{1, ld} : dnnl::memory::dims{ld, 1};
  }

  bool trans_a_, trans_b_;
  Index lda_, ldb_, ldc_;
  dnnl::matmul primitive_;
};

// Rounds blocks of kRows rows of a row-major fp32 matrix `width` wide to
// bf16 with oneDNN's reorder, which is vectorised for the CPU it runs on
// (Eigen's cast is scalar): several times faster on large operands.
class Bf16Rounding {
 public:
  static constexpr Index kRows = kBlockRows;

  // The process's reorder for this width. Call it outside a parallel region.
  static const Bf16Rounding& get(Index width) {
    return built_once<Bf16Rounding>(width, Operands::in_bf16, [&] { return Bf16Rounding(width); });
  }

  // dst (rows, width) = src rounded, rows <= kRows, on the calling thread.
  void round(const float* src, Index rows, bf16* dst) const {
    if (rows < kRows) return to_bf16(src, rows * width_, dst);
    dnnl::memory from(from_, cpu_engine(), const_cast<float*>(src));
    dnnl::memory to(to_, cpu_engine(), dst);
    reorder_.execute(this_thread_stream(), from, to);
  }

 private:
  explicit Bf16Rounding(Index width) : width_(width) {
    using dnnl::memory;
    from_ = memory::desc({kRows, width}, memory::data_type::f32, memory::format_tag::ab);
    to_ = memory::desc({kRows, width}, memory::data_type::bf16, memory::format_tag::ab);
    reorder_ = dnnl::reorder(without_scratchpad(
        dnnl::reorder::primitive_desc(cpu_engine(), from_, cpu_engine(), to_, user_scratchpad()),
        Operands::in_bf16));
  }

  Index width_;
  dnnl::memory::desc from_, to_;
  dnnl::reorder reorder_;
};

// C (kRows, n) = A (kRows, k) B + beta C with B packed once in oneDNN's
// blocked layout: oneDNN's AMX or AVX512 kernel (brgemm; oneDNN 2.6 has it
// from AVX-512 on, below which f32 runs gemm:jit on plain weights) for a
// fixed row count, which is several times faster than the runtime-size
// matmul, and allocates nothing per call (its scratchpad is the caller's).
class PackedMatmul {
 public:
  static constexpr Index kRows = kBlockRows;

  // The process's primitive for operands of this type, B (k, n) stored
  // (k, n) or, trans_b, (n, k) in fp32, and this beta. Call it outside a
  // parallel region: it throws moe::Error if oneDNN cannot build one.
  static const PackedMatmul& get(Operands type, bool trans_b, Index k, Index n, float beta) {
    return built_once<PackedMatmul>(std::tuple(type, trans_b, k, n, bits(beta)), type,
                                    [&] { return PackedMatmul(type, trans_b, k, n, beta); });
  }

  // Lines of packed B, and of scratch per thread (the scratchpad and one
  // tile of C for a partial row block).
  Index packed_lines() const { return lines(packed_desc_.get_size()); }
  Index scratch_lines() const { return scratchpad_lines() + lines(kRows * n_ * 4); }

  // packed = B (rounded to bf16 for Operands::in_bf16) in the kernel's layout,
  // on the calling thread.
  void pack(const float* b, Line* packed) const {
    const dnnl::engine& cpu = cpu_engine();
    dnnl::memory from(from_, cpu, const_cast<float*>(b)), to(packed_desc_, cpu, packed);
    pack_.execute(this_thread_stream(), from, to);
  }

  // C rows [0, rows) of a, rows <= kRows; a (bf16 or float, as the
  // operands) has kRows readable rows of k values (those past `rows` are
  // ignored). On the calling thread, with its scratch.
  void run(Index rows, const void* a, const Line* packed, float* c, Line* scratch) const {
    using dnnl::memory;
    const dnnl::engine& cpu = cpu_engine();
    float* tile = rows == kRows ? c : reinterpret_cast<float*>(scratch + scratchpad_lines());
    if (rows < kRows && beta_ != 0) std::copy(c, c + rows * n_, tile);
    const memory src(src_, cpu, const_cast<void*>(a));
    const memory weights(packed_desc_, cpu, const_cast<Line*>(packed));
    const memory dst(dst_, cpu, tile);
    const memory pad(scratchpad_desc_, cpu, scratch);
    primitive_.execute(this_thread_stream(), {{DNNL_ARG_SRC, src},
                                              {DNNL_ARG_WEIGHTS, weights},
                                              {DNNL_ARG_DST, dst},
                                              {DNNL_ARG_SCRATCHPAD, pad}});
    if (rows < kRows) std::copy(tile, tile + rows * n_, c);
  }

 private:
  PackedMatmul(Operands type, bool trans_b, Index k, Index n, float beta) : n_(n), beta_(beta) {
    using dnnl::memory;
    const auto operand =
        type == Operands::in_bf16 ? memory::data_type::bf16 : memory::data_type::f32;
    src_ = memory::desc({kRows, k}, operand, memory::dims{k, 1});
    dst_ = memory::desc({kRows, n}, memory::data_type::f32, memory::dims{n, 1});
    from_ = memory::desc({k, n}, memory::data_type::f32,
                         trans_b ? memory::dims{1, k} : memory::dims{n, 1});
    const memory::desc any({k, n}, operand, memory::format_tag::any);
    const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(src_, any, dst_),
                                          matmul_attributes(beta), cpu_engine());
    packed_desc_ = pd.weights_desc();
    scratchpad_desc_ = pd.scratchpad_desc();
    primitive_ = dnnl::matmul(pd);
    pack_ = dnnl::reorder(
        without_scratchpad(dnnl::reorder::primitive_desc(cpu_engine(), from_, cpu_engine(),
                                                         packed_desc_, user_scratchpad()),
                           type));
  }

  Index scratchpad_lines() const { return lines(scratchpad_desc_.get_size()); }

  Index n_;
  float beta_;
  dnnl::memory::desc src_, dst_, from_, packed_desc_, scratchpad_desc_;
  dnnl::matmul primitive_;
  dnnl::reorder pack_;
};

// Builds one primitive of each kind, so that a CPU oneDNN has no bf16
// kernels for (before AVX-512) is refused when the backend is constructed
// rather than at its first product. Throws moe::Error.
inline void require_bf16_kernels() {
  Bf16Matmul::get(false, false, 1, 1, 1, 0.0f);
  PackedMatmul::get(Operands::in_bf16, false, 1, 1, 0.0f);
  Bf16Rounding::get(1);
}
// The same for the f32 packed product (oneDNN has one on every x86-64 CPU:
// brgemm from AVX-512 on, below it gemm:jit on weights in plain layout; this
// surfaces a build or runtime failure at construction).
inline void require_f32_kernels() { PackedMatmul::get(Operands::in_f32, false, 1, 1, 0.0f); }

#endif

}  // namespace moe::cpu::onednn
