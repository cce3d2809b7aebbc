#pragma once
// The CPU reference of the CUDA backend's bf16 experts: cpu::Backend<float>
// whose expert GEMMs first round both operands to bf16 (round to nearest
// even, as __float2bfloat16), then multiply and accumulate in fp32, as
// cublasGemmEx does with bf16 operands and CUBLAS_COMPUTE_32F. The router's
// products stay fp32 on both.
//
// Why: against a plain fp32 reference, a ReLU expert's derivative 1[u > 0]
// flips wherever bf16 rounding moves a pre-activation u across 0, and one
// flipped unit moves a w1 or b1 gradient by a sizeable part of its largest
// value (seen on an H200). Both sides rounding the same operands leaves only
// the order of the fp32 sums and of later bf16 roundings to differ.

#include <cstdint>
#include <cstring>
#include <vector>

#include "moe/moe.hpp"

namespace moe::gpu_test {

inline float round_to_bf16(float value) {
  std::uint32_t bits = 0;
  std::memcpy(&bits, &value, sizeof bits);
  if ((bits & 0x7f800000u) == 0x7f800000u) return value;  // Inf and NaN stay
  bits += 0x7fffu + ((bits >> 16) & 1u);
  bits &= 0xffff0000u;
  std::memcpy(&value, &bits, sizeof bits);
  return value;
}

class Bf16OperandsBackend : public cpu::Backend<float> {
 public:
  static constexpr const char* kName = "cpu_bf16_operands";
  Bf16OperandsBackend() : cpu::Backend<float>(1) {}

  void grouped_gemm(const std::vector<Index>& offsets, bool trans_b, Index n, Index k,
                    const float* a, const float* b, Index b_stride, float beta, float* c) const {
    const Index experts = static_cast<Index>(offsets.size()) - 1;
    cpu::Backend<float>::grouped_gemm(offsets, trans_b, n, k, rounded(a, offsets.back() * k, a_),
                                      rounded(b, experts * b_stride, b_), b_stride, beta, c);
  }

  void grouped_gemm_tn(const std::vector<Index>& offsets, Index k, Index n, const float* a,
                       const float* b, float* w, Index w_stride) const {
    const Index rows = offsets.back();
    cpu::Backend<float>::grouped_gemm_tn(offsets, k, n, rounded(a, rows * k, a_),
                                         rounded(b, rows * n, b_), w, w_stride);
  }

 private:
  static const float* rounded(const float* src, Index n, std::vector<float>& copy) {
    copy.resize(static_cast<std::size_t>(n));
    for (Index i = 0; i < n; ++i) copy[static_cast<std::size_t>(i)] = round_to_bf16(src[i]);
    return copy.data();
  }

  // The rounded operands of the current product: one backend per thread.
  mutable std::vector<float> a_, b_;
};
static_assert(BackendPolicy<Bf16OperandsBackend>);

}  // namespace moe::gpu_test
