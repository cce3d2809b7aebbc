#pragma once
// The CUDA backend's GEMMs: fp32 products through cuBLAS, and the experts'
// grouped products. fp32 experts run as one cublasGemmGroupedBatchedEx call
// (cuBLAS 12.5 and later; one cublasSgemm per expert before). bf16 experts
// run one cublasGemmEx per expert on bf16 copies of the operands (only the
// weights of experts with rows are converted), accumulating in fp32: the
// grouped call has no bf16 x bf16 -> fp32 combination (its bf16 products
// write bf16), and the layer accumulates in fp32 (C, and the weight
// gradients with beta = 1).
//
// Row-major to column-major: row-major C = op(A) op(B) is column-major
// C^T = op(B)^T op(A)^T, so cuBLAS gets B first, with m and n swapped.

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <type_traits>
#include <vector>

#include "moe/backend/cuda/check.cuh"
#include "moe/backend/cuda/context.cuh"
#include "moe/backend/cuda/kernels.cuh"
#include "moe/backend/cuda/memory.cuh"
#include "moe/core/error.hpp"

namespace moe::cuda::detail {

inline cublasOperation_t op(bool transpose) { return transpose ? CUBLAS_OP_T : CUBLAS_OP_N; }

inline void require_int_sizes(Index m, Index n, Index k, Index lda, Index ldb, Index ldc) {
  moe::detail::require(std::max({m, n, k, lda, ldb, ldc}) <= Index{INT_MAX},
                       "moe::cuda::Backend: a GEMM size or stride above INT_MAX (m=", m, ", n=", n,
                       ", k=", k, "), expected what cuBLAS can index");
}

// Row-major C (m, n) = alpha op(A) op(B) + beta C in fp32, on the stream.
inline void sgemm(const Context& context, bool trans_a, bool trans_b, Index m, Index n, Index k,
                  float alpha, const float* a, Index lda, const float* b, Index ldb, float beta,
                  float* c, Index ldc) {
  require_int_sizes(m, n, k, lda, ldb, ldc);
  check(cublasSgemm(context.blas, op(trans_b), op(trans_a), static_cast<int>(n),
                    static_cast<int>(m), static_cast<int>(k), &alpha, b, static_cast<int>(ldb), a,
                    static_cast<int>(lda), &beta, c, static_cast<int>(ldc)),
        "cublasSgemm");
}

// The expert GEMM operands as the GEMM reads them: the fp32 pointers, or
// bf16 copies of them in the context's operand scratch.
struct Operands {
  const void* a;
  const void* b;
};

template <class T>
void convert(const Context& context, const float* src, Index n, T* dst) {
  if (n <= 0) return;
  kernels::convert<<<context.blocks(n), kBlock, 0, context.stream>>>(src, n, dst);
  check_launch("moe::cuda::kernels::convert (to bf16)");
}

// Both operands whole (the weight-gradient products: A and B are rows).
template <class T>
Operands operands(Context& context, const float* a, Index a_size, const float* b, Index b_size) {
  if constexpr (std::is_same_v<T, float>) {
    return {a, b};
  } else {
    ScratchPlan plan;
    const auto a_at = plan.add<T>(a_size), b_at = plan.add<T>(b_size);
    void* base = context.operands.reserve(plan.bytes());
    auto* a16 = ScratchPlan::at<T>(base, a_at);
    auto* b16 = ScratchPlan::at<T>(base, b_at);
    convert(context, a, a_size, a16);
    convert(context, b, b_size, b16);
    return {a16, b16};
  }
}

// A whole, and of the per-expert weights B (E slices of b_stride) only the
// slices of experts with rows: an idle expert's weights are not converted.
template <class T>
Operands expert_operands(Context& context, const std::vector<Index>& offsets, const float* a,
                         Index a_size, const float* b, Index b_stride) {
  if constexpr (std::is_same_v<T, float>) {
    return {a, b};
  } else {
    const Index E = static_cast<Index>(offsets.size()) - 1;
    ScratchPlan plan;
    const auto a_at = plan.add<T>(a_size), b_at = plan.add<T>(E * b_stride);
    void* base = context.operands.reserve(plan.bytes());
    auto* a16 = ScratchPlan::at<T>(base, a_at);
    auto* b16 = ScratchPlan::at<T>(base, b_at);
    convert(context, a, a_size, a16);
    for (Index e = 0; e < E; ++e)
      if (offsets[e + 1] > offsets[e])
        convert(context, b + e * b_stride, b_stride, b16 + e * b_stride);
    return {a16, b16};
  }
}

// One cublasGemmGroupedBatchedEx call, one group of one product per problem
// (sizes differ per expert).
inline void grouped_sgemm(Context& context, const Operands& ops, float beta) {
#if CUBLAS_VERSION >= 120500
  const std::vector<GemmProblem>& problems = context.problems;
  GroupedArrays& g = context.grouped;
  g.clear();
  const auto* a = static_cast<const float*>(ops.a);
  const auto* b = static_cast<const float*>(ops.b);
  // The pointer arrays, for the device: cuBLAS's A (our B) of every problem,
  // then its B (our A), then C.
  const std::size_t count = problems.size();
  g.pointers.assign(3 * count, nullptr);
  for (std::size_t i = 0; i < count; ++i) {
    const GemmProblem& q = problems[i];
    require_int_sizes(q.m, q.n, q.k, q.lda, q.ldb, q.ldc);
    g.trans_a.push_back(op(q.trans_b));
    g.trans_b.push_back(op(q.trans_a));
    g.m.push_back(static_cast<int>(q.n));
    g.n.push_back(static_cast<int>(q.m));
    g.k.push_back(static_cast<int>(q.k));
    g.lda.push_back(static_cast<int>(q.ldb));
    g.ldb.push_back(static_cast<int>(q.lda));
    g.ldc.push_back(static_cast<int>(q.ldc));
    g.alpha.push_back(1.0f);
    g.beta.push_back(beta);
    g.group_size.push_back(1);
    g.pointers[i] = b + q.b_offset;
    g.pointers[count + i] = a + q.a_offset;
    g.pointers[2 * count + i] = q.c;
  }
  const std::size_t bytes = g.pointers.size() * sizeof(void*);
  auto** device = static_cast<const void**>(context.pointers.reserve(bytes));
  check(cudaMemcpyAsync(device, g.pointers.data(), bytes, cudaMemcpyHostToDevice, context.stream),
        "cudaMemcpyAsync (grouped GEMM pointers)");
  check(cublasGemmGroupedBatchedEx(
            context.blas, g.trans_a.data(), g.trans_b.data(), g.m.data(), g.n.data(), g.k.data(),
            g.alpha.data(), device, CUDA_R_32F, g.lda.data(), device + count, CUDA_R_32F,
            g.ldb.data(), g.beta.data(), const_cast<void* const*>(device + 2 * count), CUDA_R_32F,
            g.ldc.data(), static_cast<int>(count), g.group_size.data(), CUBLAS_COMPUTE_32F),
        "cublasGemmGroupedBatchedEx (fp32 expert GEMMs)");
#else
  (void)context, (void)ops, (void)beta;  // never called: kGroupedCall is false
#endif
}

// One expert's product on operands (offsets in elements of T), fp32 output
// and accumulation.
template <class T>
void expert_gemm(const Context& context, const GemmProblem& q, const Operands& ops, float beta) {
  const T* a = static_cast<const T*>(ops.a) + q.a_offset;
  const T* b = static_cast<const T*>(ops.b) + q.b_offset;
  if constexpr (std::is_same_v<T, float>) {
    sgemm(context, q.trans_a, q.trans_b, q.m, q.n, q.k, 1.0f, a, q.lda, b, q.ldb, beta, q.c, q.ldc);
  } else {
    require_int_sizes(q.m, q.n, q.k, q.lda, q.ldb, q.ldc);
    const float alpha = 1.0f;
    check(
        cublasGemmEx(context.blas, op(q.trans_b), op(q.trans_a), static_cast<int>(q.n),
                     static_cast<int>(q.m), static_cast<int>(q.k), &alpha, b, CUDA_R_16BF,
                     static_cast<int>(q.ldb), a, CUDA_R_16BF, static_cast<int>(q.lda), &beta, q.c,
                     CUDA_R_32F, static_cast<int>(q.ldc), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
        "cublasGemmEx (bf16 expert GEMM)");
  }
}

// Runs every problem of context.problems: fp32 in one grouped cuBLAS call
// where cuBLAS has one, else one call per problem.
template <class T>
void run_expert_gemms(Context& context, const Operands& ops, float beta) {
  constexpr bool kGroupedCall = std::is_same_v<T, float> && CUBLAS_VERSION >= 120500;
  if (context.problems.empty()) return;
  if constexpr (kGroupedCall) {
    grouped_sgemm(context, ops, beta);
  } else {
    for (const GemmProblem& q : context.problems) expert_gemm<T>(context, q, ops, beta);
  }
}

}  // namespace moe::cuda::detail
