// GPU benchmark: the layer against cuBLAS dense GEMMs of the same active
// FLOPs, forward+backward, timed with CUDA events (cuda_timing.cu). Rows
// report an error ("no CUDA device") where there is no GPU; bench/README.md
// has the results of the runs on a GPU.

#include <benchmark/benchmark.h>

#include <string>

#include "cuda_timing.hpp"

namespace {

using moe::bench_cuda::Shape;

void layer_vs_dense(benchmark::State& state, Shape shape) {
  if (moe::bench_cuda::devices() == 0) {
    state.SkipWithError("no CUDA device");
    for (auto _ : state) {
    }
    return;
  }
  constexpr int kIterations = 10;
  moe::bench_cuda::Timing t;
  for (auto _ : state) {
    t = moe::bench_cuda::time_forward_backward(shape, kIterations);
    state.SetIterationTime(t.layer_ms * 1e-3);
  }
  state.counters["ratio_vs_dense_gemm"] = t.dense_ms / t.layer_ms;
  state.counters["layer_ms"] = t.layer_ms;
  state.counters["dense_ms"] = t.dense_ms;
  state.counters["TFLOP/s"] = t.flops / (t.layer_ms * 1e-3) * 1e-12;
  state.counters["tokens/s"] = static_cast<double>(shape.tokens) / (t.layer_ms * 1e-3);
  state.counters["max_load"] = t.max_load;
}

void register_rows() {
  struct Row {
    std::int64_t experts, d_ff;
    int k;
  };
  // Mixtral-like (E8, d_ff 5632) and fine-grained (E32, d_ff 1408), T = 16384, d = 2048.
  for (const Row row : {Row{8, 5632, 1}, Row{8, 5632, 2}, Row{8, 1408, 2}, Row{32, 1408, 1},
                        Row{32, 1408, 2}, Row{32, 1408, 4}}) {
    for (const bool bf16 : {false, true}) {
      Shape shape;
      shape.experts = row.experts;
      shape.d_ff = row.d_ff;
      shape.k = row.k;
      shape.bf16 = bf16;
      const std::string name = "CudaMoE/E" + std::to_string(row.experts) + "k" +
                               std::to_string(row.k) + "/d_ff" + std::to_string(row.d_ff) +
                               (bf16 ? "/bf16" : "/fp32") + "/fwd+bwd";
      benchmark::RegisterBenchmark(name.c_str(), layer_vs_dense, shape)
          ->UseManualTime()
          ->Iterations(1)
          ->Unit(benchmark::kMillisecond);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  if (moe::bench_cuda::devices() > 0)
    benchmark::AddCustomContext("cuda_device", moe::bench_cuda::device_name());
  else
    benchmark::AddCustomContext("cuda_device", "none (every row skipped)");
  register_rows();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
