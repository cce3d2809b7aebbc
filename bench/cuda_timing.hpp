#pragma once
// The GPU benchmark's interface between the Google Benchmark driver
// (bench_cuda.cpp, g++) and the timed CUDA code (cuda_timing.cu, nvcc).

#include <cstdint>
#include <string>

namespace moe::bench_cuda {

struct Shape {
  std::int64_t tokens = 16384, d_model = 2048, d_ff = 1408, experts = 8;
  int k = 2;
  bool bf16 = false;  // bf16 expert GEMM operands, fp32 accumulation
};

// Milliseconds per forward+backward, from CUDA events around `iterations`
// runs after one warm-up run.
struct Timing {
  double layer_ms = 0;  // moe::Layer<TopK, Sparse, cuda::Backend, SwiGLU>
  double dense_ms =
      0;             // cuBLAS GEMMs of the same active FLOPs (a dense SwiGLU FFN of width k d_ff)
  double flops = 0;  // forward+backward FLOPs of the active experts
  double max_load = 0;  // largest expert's rows / (T k / E)
};

int devices();
std::string device_name();
Timing time_forward_backward(const Shape& shape, int iterations);

}  // namespace moe::bench_cuda
