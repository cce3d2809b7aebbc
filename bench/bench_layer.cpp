// Throughput of moe::Layer (TopK router, Sparse estimator, CPU backend, float)
// against the dense GEMMs of the same active FLOPs. See bench/README.md.
//
// Shape: T = 4096 tokens, d_model = 512, d_ff = 1024, E = 8 experts, dropless.
// "Active" FLOPs count the expert GEMMs only (router, gather, activation and
// combine are not counted but are timed):
//   rows    = T k                      (routed pairs, nothing dropped)
//   forward = 2 rows d (w d_ff) + 2 rows d_ff d,   w = 2 for SwiGLU, else 1
//   fwd+bwd = 3 forward                (dH, dW2, dW1, dX: 4 GEMMs of GEMM1/2 size)
// The dense reference is one FFN of hidden width k d_ff on the same T tokens,
// i.e. exactly those FLOPs in single large Eigen GEMMs (Eigen's own threading).

#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "moe/moe.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

using moe::Index;
using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using Clock = std::chrono::steady_clock;

constexpr Index kTokens = 4096, kModel = 512, kHidden = 1024, kExperts = 8;
constexpr int kItersForward = 8, kItersBackward = 5;  // fixed: ~1 min in total on 2 cores
constexpr int kDenseReps = 5;  // timed repetitions of the dense reference (median)

RowMat random_matrix(Index rows, Index cols, unsigned seed) {
  std::srand(seed);
  return RowMat::Random(rows, cols);  // U(-1, 1)
}

// Expert GEMM FLOPs of one forward (dropless: every token goes to k experts).
double forward_flops(int k, Index width) {
  const double rows = static_cast<double>(kTokens) * k;
  return 2.0 * rows * kModel * static_cast<double>(width * kHidden) +
         2.0 * rows * static_cast<double>(kHidden) * kModel;
}

double active_flops(int k, Index width, bool backward) {
  return (backward ? 3.0 : 1.0) * forward_flops(k, width);
}

// One dense FFN with hidden width H = k d_ff (GEMM1 width w H) on T tokens:
// the same GEMM FLOPs as the MoE's experts, in six large GEMMs. No activation:
// hidden and d_pre are fixed random inputs, this measures GEMMs only.
struct DenseReference {
  RowMat x, w1, pre, hidden, w2, y;  // forward
  RowMat dy, d_hidden, d_pre, dw1, dw2, dx;  // backward

  DenseReference(int k, Index width) {
    const Index H = k * kHidden, W = width * H;
    x = random_matrix(kTokens, kModel, 1);
    w1 = random_matrix(kModel, W, 2) / std::sqrt(float(kModel));
    pre.resize(kTokens, W);
    hidden = random_matrix(kTokens, H, 3);
    w2 = random_matrix(H, kModel, 4) / std::sqrt(float(H));
    y.resize(kTokens, kModel);
    dy = random_matrix(kTokens, kModel, 5);
    d_hidden.resize(kTokens, H);
    d_pre = random_matrix(kTokens, W, 6);
    dw1 = RowMat::Zero(kModel, W);
    dw2 = RowMat::Zero(H, kModel);
    dx.resize(kTokens, kModel);
  }

  void run(bool backward) {
    pre.noalias() = x * w1;                        // GEMM1
    y.noalias() = hidden * w2;                     // GEMM2
    if (backward) {
      d_hidden.noalias() = dy * w2.transpose();    // dH  = dY W2^T
      dw2.noalias() += hidden.transpose() * dy;    // dW2 += H^T dY
      dw1.noalias() += x.transpose() * d_pre;      // dW1 += X^T dPre
      dx.noalias() = d_pre * w1.transpose();       // dX  = dPre W1^T
    }
    benchmark::DoNotOptimize(pre.data());
    benchmark::DoNotOptimize(y.data());
    benchmark::DoNotOptimize(dx.data());
    benchmark::DoNotOptimize(dw1.data());
    benchmark::ClobberMemory();
  }

  // Median wall time of one run() over kDenseReps, after one warm-up.
  double median_seconds(bool backward) {
    run(backward);
    std::vector<double> t;
    for (int r = 0; r < kDenseReps; ++r) {
      const auto t0 = Clock::now();
      run(backward);
      t.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
    }
    std::nth_element(t.begin(), t.begin() + kDenseReps / 2, t.end());
    return t[kDenseReps / 2];
  }
};

void set_counters(benchmark::State& state, double flops_per_iter) {
  const auto it = static_cast<double>(state.iterations());  // kIsRate divides by real time
  state.counters["GFLOP/s"] = benchmark::Counter(flops_per_iter * it / 1e9,
                                                 benchmark::Counter::kIsRate);
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(kTokens) * it,
                                                  benchmark::Counter::kIsRate);
}

// MoE forward (Mode::train) or forward + backward; range(0) = k.
template <class Act, bool kBackward>
void BM_MoE(benchmark::State& state) {
  using Layer =
      moe::Layer<moe::router::TopK, moe::estimator::Sparse, moe::cpu::Backend<float>, Act>;
  const int k = static_cast<int>(state.range(0));
  const moe::LayerConfig config{.d_model = kModel, .d_ff = kHidden, .experts = kExperts};
  Layer layer(config, moe::router::TopK{.k = k}, {}, /*seed=*/42);
  const RowMat x = random_matrix(kTokens, kModel, 11);
  const RowMat dy = random_matrix(kTokens, kModel, 12);
  RowMat y(kTokens, kModel), dx(kTokens, kModel);
  auto grads = layer.make_gradients();  // accumulates across iterations, never re-zeroed
  typename Layer::Cache cache;

  auto step = [&] {
    layer.forward(x, y, cache, moe::Mode::train);
    if constexpr (kBackward) layer.backward(x, cache, dy, dx, grads);
    benchmark::DoNotOptimize(y.data());
    benchmark::DoNotOptimize(dx.data());
    benchmark::ClobberMemory();
  };
  step();  // warm-up: sizes the cache, the workspace and the backend scratch

  // The dense reference of the same active FLOPs, timed in this same process
  // right before the MoE loop.
  double dense_s = 0;
  {
    DenseReference dense(k, Layer::kInputWidth);
    dense_s = dense.median_seconds(kBackward);
  }

  const auto t0 = Clock::now();
  for (auto _ : state) step();
  const double moe_s = std::chrono::duration<double>(Clock::now() - t0).count() /
                       static_cast<double>(state.iterations());

  set_counters(state, active_flops(k, Layer::kInputWidth, kBackward));
  state.counters["ratio_vs_dense_gemm"] = dense_s / moe_s;
  const auto& load = cache.stats().tokens_per_expert;
  const double mean_load = static_cast<double>(kTokens) * k / kExperts;
  state.counters["max_load"] =
      static_cast<double>(*std::max_element(load.begin(), load.end())) / mean_load;
}

// The dense GEMMs alone (same FLOPs as BM_MoE with the same Act, k).
template <class Act, bool kBackward>
void BM_DenseGemm(benchmark::State& state) {
  const int k = static_cast<int>(state.range(0));
  const Index width = Act::kGated ? 2 : 1;
  DenseReference dense(k, width);
  dense.run(kBackward);  // warm-up
  for (auto _ : state) dense.run(kBackward);
  set_counters(state, active_flops(k, width, kBackward));
}

using BenchFn = void (*)(benchmark::State&);

// MoE and its dense reference side by side, for k = 1 and 2.
template <class Act, bool kBackward>
void register_pair() {
  const std::string name = std::string(Act::kName) + (kBackward ? "/fwd+bwd" : "/fwd");
  const std::pair<const char*, BenchFn> benches[] = {
      {"MoE/", &BM_MoE<Act, kBackward>}, {"DenseGemm/", &BM_DenseGemm<Act, kBackward>}};
  for (int k : {1, 2}) {
    for (const auto& [prefix, fn] : benches) {
      benchmark::RegisterBenchmark((prefix + name).c_str(), fn)
          ->ArgName("k")
          ->Arg(k)
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond)
          ->Iterations(kBackward ? kItersBackward : kItersForward);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
#if defined(_OPENMP)
  benchmark::AddCustomContext("omp_max_threads", std::to_string(omp_get_max_threads()));
#else
  benchmark::AddCustomContext("omp_max_threads", "1 (built without OpenMP)");
#endif
  benchmark::AddCustomContext("eigen_threads", std::to_string(Eigen::nbThreads()));
  benchmark::AddCustomContext("eigen_simd", Eigen::SimdInstructionSetsInUse());
#if defined(EIGEN_VECTORIZE)
  benchmark::AddCustomContext("eigen_vectorize", "on");
#else
  benchmark::AddCustomContext("eigen_vectorize", "off");
#endif
  benchmark::AddCustomContext("shape", "T=" + std::to_string(kTokens) + " d_model=" +
                                           std::to_string(kModel) + " d_ff=" +
                                           std::to_string(kHidden) + " E=" +
                                           std::to_string(kExperts));
  register_pair<moe::act::GELU, false>();
  register_pair<moe::act::GELU, true>();
  register_pair<moe::act::SwiGLU, false>();
  register_pair<moe::act::SwiGLU, true>();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
