// Timed GPU runs of the layer and of its dense yardstick (see cuda_timing.hpp).

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <memory>
#include <vector>

#include "cuda_timing.hpp"
#include "moe/cuda.cuh"

namespace moe::bench_cuda {

int devices() { return cuda::device_count(); }

std::string device_name() {
  cudaDeviceProp prop{};
  cuda::detail::check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  return prop.name;
}

namespace {

// Elapsed milliseconds of f() over `iterations` runs, between two events.
template <class F>
double time_ms(int iterations, F&& f) {
  f();  // warm-up: workspaces and cuBLAS heuristics
  cuda::detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  cudaEvent_t start, stop;
  cuda::detail::check(cudaEventCreate(&start), "cudaEventCreate");
  cuda::detail::check(cudaEventCreate(&stop), "cudaEventCreate");
  cuda::detail::check(cudaEventRecord(start), "cudaEventRecord");
  for (int i = 0; i < iterations; ++i) f();
  // The layer runs on its backend's own (non-blocking) stream: wait for the
  // whole device, so the stop event follows every stream's work.
  cuda::detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  cuda::detail::check(cudaEventRecord(stop), "cudaEventRecord");
  cuda::detail::check(cudaEventSynchronize(stop), "cudaEventSynchronize");
  float ms = 0;
  cuda::detail::check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return static_cast<double>(ms) / iterations;
}

// Row-major C (m, n) = op(A) op(B) on cuBLAS, in the operand type of the shape.
void dense_gemm(cublasHandle_t blas, bool bf16, bool trans_a, bool trans_b, int m, int n, int k,
                const void* a, const void* b, float* c) {
  const float alpha = 1, beta = 0;
  const int lda = trans_a ? m : k, ldb = trans_b ? k : n;
  const auto op = [](bool t) { return t ? CUBLAS_OP_T : CUBLAS_OP_N; };
  const cudaDataType type = bf16 ? CUDA_R_16BF : CUDA_R_32F;
  cuda::detail::check(
      cublasGemmEx(blas, op(trans_b), op(trans_a), n, m, k, &alpha, b, type, ldb, a, type, lda,
                   &beta, c, CUDA_R_32F, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
      "cublasGemmEx (dense yardstick)");
}

template <class T>
Timing run(const Shape& s, int iterations) {
  using Layer = moe::Layer<router::TopK, estimator::Sparse, cuda::Backend<T>, act::SwiGLU>;
  const Index T_ = s.tokens, d = s.d_model, h = s.d_ff;
  Layer layer({.d_model = d, .d_ff = h, .experts = s.experts}, router::TopK{.k = s.k}, {}, 1,
              cuda::Backend<T>(0));
  cuda::ManagedBuffer<float> x, y, dy, dx;
  for (auto* b : {&x, &y, &dy, &dx}) b->resize(static_cast<std::size_t>(T_ * d));
  for (Index i = 0; i < T_ * d; ++i) {
    x[static_cast<std::size_t>(i)] =
        static_cast<float>(2 * math::uniform01(1, 0, static_cast<std::uint64_t>(i)) - 1);
    dy[static_cast<std::size_t>(i)] =
        static_cast<float>(2 * math::uniform01(1, 1, static_cast<std::uint64_t>(i)) - 1);
  }
  auto grads = layer.make_gradients();
  typename Layer::Cache cache;
  const MatrixView<const float> xv(x.data(), T_, d), dyv(dy.data(), T_, d);
  Timing t;
  t.layer_ms = time_ms(iterations, [&] {
    layer.forward(xv, MatrixView<float>(y.data(), T_, d), cache, Mode::train);
    layer.backward(xv, cache, dyv, MatrixView<float>(dx.data(), T_, d), grads);
  });
  const auto& load = cache.stats().tokens_per_expert;
  Index largest = 0;
  for (Index n : load) largest = n > largest ? n : largest;
  t.max_load = static_cast<double>(largest) * static_cast<double>(s.experts) /
               (static_cast<double>(T_) * s.k);

  // Dense SwiGLU FFN of width w = k d_ff: forward X W1 (T, 2w), H W2 (T, d);
  // backward dH = dO W2^T, dW2 = H^T dO, dX = dP W1^T, dW1 = X^T dP.
  const int tokens = static_cast<int>(T_), dm = static_cast<int>(d);
  const int w = static_cast<int>(s.k * h);
  const std::size_t elem = s.bf16 ? sizeof(__nv_bfloat16) : sizeof(float);
  cuda::DeviceScratch xs, w1, w2, hidden, pre, out;
  void* X = xs.reserve(elem * tokens * dm);
  void* W1 = w1.reserve(elem * dm * 2 * w);
  void* W2 = w2.reserve(elem * w * dm);
  const std::size_t wide = static_cast<std::size_t>(2 * w > dm ? 2 * w : dm);  // also dO, dP
  void* H = hidden.reserve(elem * tokens * wide);
  auto* P = static_cast<float*>(pre.reserve(sizeof(float) * tokens * wide));
  auto* O = static_cast<float*>(out.reserve(sizeof(float) * tokens * wide));
  // Zeros: the values do not change a GEMM's time.
  cuda::detail::check(cudaMemset(X, 0, elem * tokens * dm), "cudaMemset");
  cuda::detail::check(cudaMemset(W1, 0, elem * dm * 2 * w), "cudaMemset");
  cuda::detail::check(cudaMemset(W2, 0, elem * w * dm), "cudaMemset");
  cuda::detail::check(cudaMemset(H, 0, elem * tokens * wide), "cudaMemset");
  cublasHandle_t blas;
  cuda::detail::check(cublasCreate(&blas), "cublasCreate");
  const bool b16 = s.bf16;
  t.dense_ms = time_ms(iterations, [&] {
    dense_gemm(blas, b16, false, false, tokens, 2 * w, dm, X, W1, P);  // forward
    dense_gemm(blas, b16, false, false, tokens, dm, w, H, W2, O);
    dense_gemm(blas, b16, false, true, tokens, w, dm, H, W2, P);      // dH = dO W2^T
    dense_gemm(blas, b16, true, false, w, dm, tokens, H, H, O);       // dW2 = H^T dO
    dense_gemm(blas, b16, false, true, tokens, dm, 2 * w, H, W1, O);  // dX = dP W1^T
    dense_gemm(blas, b16, true, false, dm, 2 * w, tokens, X, H, O);   // dW1 = X^T dP
  });
  cublasDestroy(blas);
  // Forward 2 T d (2w) + 2 T w d = 6 T d w; the backward twice that.
  t.flops = 18.0 * static_cast<double>(T_) * static_cast<double>(d) * static_cast<double>(w);
  return t;
}

}  // namespace

Timing time_forward_backward(const Shape& shape, int iterations) {
  return shape.bf16 ? run<__nv_bfloat16>(shape, iterations) : run<float>(shape, iterations);
}

}  // namespace moe::bench_cuda
