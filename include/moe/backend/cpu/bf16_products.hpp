#pragma once
// The expert products of the oneDNN engines (see moe/backend/cpu/onednn.hpp),
// over the CPU backend's parallel loop. Every tile is one oneDNN call on one
// thread whose boundaries depend on the shapes and the routing only: results
// are bitwise the same for any thread count.
//
// - Products with the weights (forward, and the input gradients), both
//   engines: each expert's weights are packed once per call into the
//   kernel's layout, and its rows run in blocks of kBlockRows (64), the last
//   one padded with zero rows.
//   - onednn_bf16 rounds each operand to bf16 once per call. Packing wins
//     over the runtime-size matmul even at one row per expert (which
//     rounds the weights to bf16 as well).
//   - onednn_f32 reads the rows in place, and leaves experts of at most
//     kSkinnyRows rows to the backend's skinny kernel on the weights as
//     stored (packing them would read them twice and write them once).
// - Weight gradients (W_e += A_e^T B_e, both operands activations): on
//   onednn_bf16 the runtime-size matmul, tiled like the fp32 engines; on
//   onednn_f32 the backend's own (BLAS or Eigen) path.

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "moe/backend/cpu/onednn.hpp"
#include "moe/backend/cpu/serial_gemm.hpp"
#include "moe/backend/cpu/tiling.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace moe::cpu::detail {

// Nothing may leave an OpenMP region: a loop body's exception (oneDNN's
// dnnl::error, e.g. out of memory) is kept, and the first one is thrown
// after the loop as moe::Error naming the engine of operands of `type`.
class LoopErrors {
 public:
  explicit LoopErrors(onednn::Operands type) : type_(type) {}
  template <class F>
  void run(F&& body) noexcept {
    try {
      body();
    } catch (const std::exception& e) {
      keep(e.what());
    } catch (...) {
      keep("an unknown exception");
    }
  }
  void rethrow() const {
    if (failed_)
      throw Error(moe::detail::concat(onednn::engine_of(type_), ", oneDNN failed: ", what_));
  }

 private:
  void keep(const char* what) noexcept {
    const std::lock_guard<std::mutex> lock(mutex_);
    if (failed_) return;
    failed_ = true;
    try {
      what_ = what;
    } catch (...) {  // no memory for the message: the flag still says it failed
    }
  }
  onednn::Operands type_;
  std::mutex mutex_;
  bool failed_ = false;
  std::string what_;
};

// Reached only when one program mixes translation units built with and
// without MOE_HAVE_DNNL (Backend refuses the engine without it): stop
// rather than leave the product unwritten.
template <class... Unused>
[[noreturn]] void missing_onednn(const Unused&...) {
  std::fputs(
      "moe::cpu::Backend: a oneDNN engine reached a translation unit built without "
      "MOE_HAVE_DNNL (link every target of the program with moe::onednn)\n",
      stderr);
  std::abort();
}

// call(i) for every i in [0, n) over the backend's parallel loop (work: its
// size in flops), each with OpenMP's thread count held at 1 (oneDNN splits
// a long sum by it); the first exception is thrown after the loop, naming
// the engine of operands of `type`.
template <class B, class Call>
void for_each_call(const B& be, onednn::Operands type, Index n, Index work, Call&& call) {
  LoopErrors errors(type);
  be.parallel_for_tiles(
      n,
      [&](Index i) {
        errors.run([&] {
          [[maybe_unused]] SerialOpenMP serial_icv;
          call(i);
        });
      },
      work);
  errors.rethrow();
}

// dst (rows, width) = src rounded to bf16, in parallel over blocks of
// Bf16Rounding::kRows rows.
template <class B>
void bf16_operand(const B& be, const float* src, Index rows, Index width,
                  std::vector<onednn::bf16>& dst) {
#if defined(MOE_HAVE_DNNL)
  using Rounding = onednn::Bf16Rounding;
  const Rounding& rounding = Rounding::get(width);  // not inside a region
  dst.resize(static_cast<std::size_t>(rows * width));
  onednn::bf16* out = dst.data();
  const Index blocks = (rows + Rounding::kRows - 1) / Rounding::kRows;
  for_each_call(be, onednn::Operands::in_bf16, blocks, rows * width, [&](Index i) {
    const Index row = i * Rounding::kRows;
    rounding.round(src + row * width, std::min(Rounding::kRows, rows - row), out + row * width);
  });
#else
  missing_onednn(be, src, rows, width, dst);
#endif
}

// The slot of the calling thread in a parallel loop opened at `level`: its
// team number inside the loop's region, 0 when the loop ran serially.
inline int loop_slot([[maybe_unused]] int level) {
#if defined(_OPENMP)
  return omp_get_level() > level ? omp_get_thread_num() : 0;
#else
  return 0;
#endif
}
inline int parallel_level() {
#if defined(_OPENMP)
  return omp_get_level();
#else
  return 0;
#endif
}

// Every tile of the plan as one runtime-size bf16 matmul of the given
// layout; operands(tile) gives its (m, n, k, a, b, c); work: the flops.
template <class B, class Operands>
void run_bf16_tiles(const B& be, const TilePlan& plan, bool trans_a, bool trans_b, Index lda,
                    Index ldb, Index ldc, float beta, Index work, Operands&& operands) {
#if defined(MOE_HAVE_DNNL)
  // Built (or found) here: a failure must not leave the parallel region.
  const auto& matmul = onednn::Bf16Matmul::get(trans_a, trans_b, lda, ldb, ldc, beta);
  for_each_call(be, onednn::Operands::in_bf16, plan.items(), work, [&](Index i) {
    Tile t;
    if (!plan.tile(i, t)) return;
    const auto [m, n, k, a, b, c] = operands(t);
    matmul.run(m, n, k, a, b, c);
  });
#else
  missing_onednn(be, plan, trans_a, trans_b, lda, ldb, ldc, beta, work, operands);
#endif
}

// C_e (n_e, n) = A_e op(B_e) + beta C_e for every expert
// (Backend::grouped_gemm) on the packed matmul with operands of type
// `Type`: each expert's B packed once, its rows in blocks of kRows (see the
// top of this file). bf16: A is rounded once, block by block, each block
// padded to kRows rows with zeros. f32: the kernel reads A where it is, a
// partial last block is copied, padded, into the thread's scratch, and an
// expert of at most kSkinnyRows rows runs the skinny kernel instead.
template <onednn::Operands Type, class B>
void packed_grouped_gemm(const B& be, const std::vector<Index>& offsets, bool trans_b, Index n,
                         Index k, const float* a, const float* b, Index b_stride, float beta,
                         float* c) {
  if (offsets.back() == 0 || n == 0) return;
  if (k == 0) return scale(offsets.back(), n, beta, c, n);
#if defined(MOE_HAVE_DNNL)
  using Matmul = onednn::PackedMatmul;
  constexpr Index M = Matmul::kRows;
  const Matmul& matmul = Matmul::get(Type, trans_b, k, n, beta);  // not inside a region
  onednn::Workspace& ws = onednn::Workspace::of_this_thread();
  const Index experts = static_cast<Index>(offsets.size()) - 1;
  // Expert e's rows are blocks [blocks[e], blocks[e + 1]) of kRows rows.
  std::vector<Index>& blocks = ws.block_offsets;
  blocks.resize(static_cast<std::size_t>(experts + 1));
  blocks[0] = 0;
  for (Index e = 0; e < experts; ++e)
    blocks[e + 1] = blocks[e] + (offsets[e + 1] - offsets[e] + M - 1) / M;
  const Index total = blocks[experts];
  const auto block_rows = [&](Index i, Index& e, Index& row) {  // rows of block i
    e = std::upper_bound(blocks.begin(), blocks.end(), i) - blocks.begin() - 1;
    row = offsets[e] + (i - blocks[e]) * M;
    return std::min(M, offsets[e + 1] - row);
  };
  // f32: whether expert e skips packing (a few rows: the skinny kernel).
  const auto unpacked = [&](Index e) {
    return Type == onednn::Operands::in_f32 && offsets[e + 1] - offsets[e] <= B::kSkinnyRows;
  };
  if constexpr (Type == onednn::Operands::in_bf16) {
    const onednn::Bf16Rounding& rounding = onednn::Bf16Rounding::get(k);
    ws.a.resize(static_cast<std::size_t>(total * M * k));
    onednn::bf16* a16 = ws.a.data();
    for_each_call(be, Type, total, total * M * k, [&](Index i) {
      Index e, row;
      const Index rows = block_rows(i, e, row);
      rounding.round(a + row * k, rows, a16 + i * M * k);
      std::fill(a16 + (i * M + rows) * k, a16 + (i + 1) * M * k, onednn::bf16(0.0f));
    });
  }
  // The weights of the experts that have rows (and are not left unpacked),
  // in the kernel's layout.
  const Index packed_lines = matmul.packed_lines();
  ws.packed.resize(static_cast<std::size_t>(experts * packed_lines));
  onednn::Line* packed = ws.packed.data();
  for_each_call(be, Type, experts, experts * k * n, [&](Index e) {
    if (offsets[e + 1] > offsets[e] && !unpacked(e))
      matmul.pack(b + e * b_stride, packed + e * packed_lines);
  });
  // Per thread: the matmul's scratch, then (f32) one padded block of A.
  const Index a_lines = Type == onednn::Operands::in_f32 ? onednn::lines(M * k * sizeof(float)) : 0;
  const Index scratch_lines = matmul.scratch_lines() + a_lines;
  ws.scratch.resize(static_cast<std::size_t>(be.threads() * scratch_lines));
  onednn::Line* scratch = ws.scratch.data();
  const int level = parallel_level();
  for_each_call(be, Type, total, total * M * n * k, [&](Index i) {
    Index e, row;
    const Index rows = block_rows(i, e, row);
    if (unpacked(e))
      return be.gemm(false, trans_b, rows, n, k, 1.0f, a + row * k, k, b + e * b_stride,
                     trans_b ? k : n, beta, c + row * n, n);
    onednn::Line* own = scratch + loop_slot(level) * scratch_lines;
    const void* block = nullptr;
    if constexpr (Type == onednn::Operands::in_bf16) {
      block = ws.a.data() + i * M * k;
    } else {
      const float* from = a + row * k;
      if (rows < M) {  // the kernel reads kRows rows: pad a copy
        float* padded = reinterpret_cast<float*>(own + matmul.scratch_lines());
        std::fill(std::copy(from, from + rows * k, padded), padded + M * k, 0.0f);
        from = padded;
      }
      block = from;
    }
    matmul.run(rows, block, packed + e * packed_lines, c + row * n, own);
  });
#else
  missing_onednn(be, offsets, trans_b, n, k, a, b, b_stride, beta, c);
#endif
}

// W_e (k, n) += A_e^T B_e for every expert (Backend::grouped_gemm_tn).
template <class B>
void bf16_grouped_gemm_tn(const B& be, const TilePlan& plan, const std::vector<Index>& offsets,
                          Index k, Index n, const float* a, const float* b, float* w,
                          Index w_stride) {
  const Index rows = offsets.back();
  if (rows == 0 || k == 0 || n == 0) return;
  onednn::Workspace& ws = onednn::Workspace::of_this_thread();
  bf16_operand(be, a, rows, k, ws.a);
  bf16_operand(be, b, rows, n, ws.b);
  run_bf16_tiles(be, plan, true, false, k, n, n, 1.0f, rows * n * k, [&](const Tile& t) {
    return std::tuple(k, t.cols, t.rows, ws.a.data() + t.row * k, ws.b.data() + t.row * n + t.col,
                      w + t.expert * w_stride + t.col);
  });
}

}  // namespace moe::cpu::detail
