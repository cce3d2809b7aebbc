#pragma once
// The cases the GPU suite runs on both backends, and what it compares: one
// list, compiled into the CPU reference (test_cuda.cpp, g++) and into the CUDA
// run (cuda_cases.cu, nvcc). Host-only: no Eigen, no CUDA headers.

#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "moe/common.hpp"

namespace moe::gpu_test {

struct Shape {
  Index tokens = 37, d_model = 24, d_ff = 40, experts = 6;
  bool expert_bias = false;
  double dropout = 0;
  double capacity_factor = 0;
};

// Everything a case produces, copied to host vectors.
struct Outcome {
  std::string name;
  std::vector<float> y, dx;   // of the second training step
  std::vector<float> grads;   // accumulated over both steps
  std::vector<float> y_eval;  // an eval forward after the steps
  std::vector<double> state;  // the layer's state (EMA, counters, lambda, step)
  std::vector<TensorSpec> grad_tensors, state_tensors;  // the names and offsets in grads, state
  std::vector<Index> tokens_per_expert;
  double aux_loss = 0;
  Index dropped = 0;
};

// Deterministic inputs, the same on every backend.
inline float input_value(std::uint64_t stream, Index i) {
  return static_cast<float>(2.0 * math::uniform01(0x6770757465737400ull, stream, i) - 1.0);
}

// Two training steps (forward, backward, end_step) and an eval forward of
// one layer on `backend`; inputs live in the backend's memory.
template <class Activation, class Backend, class Router, class Estimator,
          class Dispatcher = dispatch::Local>
Outcome run(const std::string& name, const Backend& backend, const Shape& s, Router router,
            Estimator estimator, const std::vector<int>& previous_assignment,
            Dispatcher dispatcher = {}) {
  using Layer = moe::Layer<Router, Estimator, Backend, Activation, Dispatcher>;
  using Buffer = typename Backend::template Buffer<float>;
  const LayerConfig config{.d_model = s.d_model,
                           .d_ff = s.d_ff,
                           .experts = s.experts,
                           .expert_bias = s.expert_bias,
                           .dropout = s.dropout,
                           .capacity_factor = s.capacity_factor};
  Layer layer(config, std::move(router), std::move(estimator), /*seed=*/7, backend,
              std::move(dispatcher));
  const Index n = s.tokens * s.d_model;
  Buffer x, dy, y, dx;
  for (Buffer* b : {&x, &dy, &y, &dx}) b->resize(static_cast<std::size_t>(n));
  auto grads = layer.make_gradients();
  typename Layer::Cache cache;
  const ForwardContext context{.previous_assignment = previous_assignment};
  Outcome out;
  out.name = name;
  for (std::uint64_t step = 0; step < 2; ++step) {
    for (Index i = 0; i < n; ++i) {
      x[static_cast<std::size_t>(i)] = input_value(2 * step, i);
      dy[static_cast<std::size_t>(i)] = input_value(2 * step + 1, i);
    }
    const MatrixView<float> xv(x.data(), s.tokens, s.d_model), yv(y.data(), s.tokens, s.d_model);
    layer.forward(xv, yv, cache, Mode::train, context);
    layer.backward(xv, cache, MatrixView<const float>(dy.data(), s.tokens, s.d_model),
                   MatrixView<float>(dx.data(), s.tokens, s.d_model), grads);
    layer.end_step(step + 1);
  }
  out.y.assign(y.data(), y.data() + n);
  out.dx.assign(dx.data(), dx.data() + n);
  out.grads.assign(grads.flat().begin(), grads.flat().end());
  out.state.assign(layer.state().flat().begin(), layer.state().flat().end());
  out.grad_tensors = grads.layout().specs();
  out.state_tensors = layer.state().layout().specs();
  out.tokens_per_expert = cache.stats().tokens_per_expert;
  out.aux_loss = cache.stats().aux_loss;
  out.dropped = cache.stats().dropped_pairs;
  layer.forward(MatrixView<const float>(x.data(), s.tokens, s.d_model),
                MatrixView<float>(y.data(), s.tokens, s.d_model), cache, Mode::eval, context);
  out.y_eval.assign(y.data(), y.data() + n);
  return out;
}

// Every router x estimator, each activation, biases, dropout, capacity drops,
// T = 1, k = E, an expert with no tokens and a clustered ACMoE layer: calls
// visit(name, shape, router, estimator, activation, previous_assignment).
template <class Visit>
void for_each_case(Visit&& visit) {
  namespace r = moe::router;
  namespace e = moe::estimator;
  const Shape base{};
  Shape biased = base;
  biased.expert_bias = true;
  biased.dropout = 0.25;
  Shape capped = base;
  capped.capacity_factor = 1.0;
  Shape one_token = base;
  one_token.tokens = 1;
  Shape idle = base;  // 2 tokens, 8 experts, k = 1: most experts get none
  idle.tokens = 2;
  idle.experts = 8;
  const auto relu = [](int k, Index experts) {
    return r::ReluL1{.controller = std::make_shared<r::LambdaController>(
                         r::LambdaController::for_experts(k, static_cast<int>(experts))),
                     .k = k};
  };
  std::vector<int> clusters(static_cast<std::size_t>(base.tokens));
  for (std::size_t t = 0; t < clusters.size(); ++t) clusters[t] = static_cast<int>(t % 4) - 1;
  const std::vector<int> none;

  visit("topk/sparse/swiglu", base, r::TopK{.k = 2, .z_coef = 1e-3}, e::Sparse{}, act::SwiGLU{},
        none);
  visit("topk/default_ema/gelu", base, r::TopK{.k = 2}, e::DefaultEMA{.beta = 0.9}, act::GELU{},
        none);
  visit("topk/dense_exact/relu+bias+dropout", biased, r::TopK{.k = 2, .renormalize = true},
        e::DenseExact{}, act::ReLU{}, none);
  visit("topk/sparse/gelu+capacity", capped, r::TopK{.k = 2}, e::Sparse{}, act::GELU{}, none);
  visit("topk/sparse/relu k=E", base, r::TopK{.k = 6, .bias = true}, e::Sparse{}, act::ReLU{},
        none);
  visit("topk/sparse/swiglu T=1", one_token, r::TopK{.k = 2}, e::Sparse{}, act::SwiGLU{}, none);
  visit("topk/default_ema/swiglu idle experts", idle, r::TopK{.k = 1}, e::DefaultEMA{.beta = 0.5},
        act::SwiGLU{}, none);
  visit("relu_l1/sparse/swiglu", base, relu(2, base.experts), e::Sparse{}, act::SwiGLU{}, none);
  visit("relu_l1/default_ema/gelu", base, relu(2, base.experts), e::DefaultEMA{}, act::GELU{},
        none);
  visit("relu_l1/dense_exact/relu", base, relu(2, base.experts), e::DenseExact{}, act::ReLU{},
        none);
  visit("adaptive_cluster/sparse/swiglu first layer", base, r::AdaptiveCluster{.k = 2}, e::Sparse{},
        act::SwiGLU{}, none);
  visit("adaptive_cluster/default_ema/gelu clustered", base, r::AdaptiveCluster{.k = 2},
        e::DefaultEMA{}, act::GELU{}, clusters);
  visit("adaptive_cluster/dense_exact/relu clustered", base, r::AdaptiveCluster{.k = 2},
        e::DenseExact{}, act::ReLU{}, clusters);
  visit("random_frozen/sparse/gelu k 1..3", base,
        r::random_frozen(r::schedule::Linear{.k_min = 1, .k_max = 3, .total_steps = 2}),
        e::Sparse{}, act::GELU{}, none);
  visit("random_frozen/default_ema/swiglu", base,
        r::random_frozen(r::schedule::Linear{.k_min = 2, .k_max = 4, .total_steps = 2}),
        e::DefaultEMA{}, act::SwiGLU{}, none);
  visit("random_frozen/dense_exact/relu+bias", biased,
        r::random_frozen(r::schedule::Linear{.k_min = 2, .k_max = 3, .total_steps = 2}),
        e::DenseExact{}, act::ReLU{}, none);
}

// Every case on `backend` (and `dispatcher`), in order.
template <class Backend, class Dispatcher = dispatch::Local>
std::vector<Outcome> run_cases(const Backend& backend, const Dispatcher& dispatcher = {}) {
  std::vector<Outcome> outcomes;
  for_each_case([&](const char* name, const Shape& shape, auto router, auto estimator, auto act,
                    const std::vector<int>& previous) {
    using Activation = decltype(act);
    outcomes.push_back(run<Activation>(name, backend, shape, std::move(router),
                                       std::move(estimator), previous, dispatcher));
  });
  return outcomes;
}

// One layer (TopK, DefaultEMA, GELU with biases) trained for one step, then
// eval forwards of four batches: one after the other, and from four threads
// at once, each with its own cache, several times. Returns the serial
// outputs followed by the concurrent ones (each thread's last).
template <class Backend>
std::vector<std::vector<float>> serial_and_concurrent_eval(const Backend& backend) {
  using Layer = moe::Layer<router::TopK, estimator::DefaultEMA, Backend, act::GELU>;
  using Buffer = typename Backend::template Buffer<float>;
  const Shape s{};
  Layer layer({.d_model = s.d_model, .d_ff = s.d_ff, .experts = s.experts, .expert_bias = true},
              router::TopK{.k = 2}, estimator::DefaultEMA{}, /*seed=*/3, backend);
  constexpr int kBatches = 4, kRepeats = 5;
  std::vector<Buffer> x(kBatches);
  std::vector<Index> tokens(kBatches);
  for (int b = 0; b < kBatches; ++b) {
    tokens[b] = 11 + 9 * b;
    x[b].resize(static_cast<std::size_t>(tokens[b] * s.d_model));
    for (Index i = 0; i < tokens[b] * s.d_model; ++i)
      x[b][static_cast<std::size_t>(i)] = input_value(10 + b, i);
  }
  {  // one training step, so that the EMA is not zero
    Buffer y, dx;
    y.resize(x[3].size());
    dx.resize(x[3].size());
    typename Layer::Cache cache;
    auto grads = layer.make_gradients();
    const MatrixView<const float> xv(x[3].data(), tokens[3], s.d_model);
    layer.forward(xv, MatrixView<float>(y.data(), tokens[3], s.d_model), cache, Mode::train);
    layer.backward(xv, cache, xv, MatrixView<float>(dx.data(), tokens[3], s.d_model), grads);
  }
  const auto eval = [&](int b, typename Layer::Cache& cache, Buffer& y) {
    y.resize(x[b].size());
    layer.forward(MatrixView<const float>(x[b].data(), tokens[b], s.d_model),
                  MatrixView<float>(y.data(), tokens[b], s.d_model), cache, Mode::eval);
    return std::vector<float>(y.data(), y.data() + y.size());
  };
  std::vector<std::vector<float>> out(2 * kBatches);
  for (int b = 0; b < kBatches; ++b) {
    typename Layer::Cache cache;
    Buffer y;
    out[b] = eval(b, cache, y);
  }
  std::vector<std::thread> threads;
  for (int b = 0; b < kBatches; ++b) {
    threads.emplace_back([&, b] {
      typename Layer::Cache cache;
      Buffer y;
      for (int r = 0; r < kRepeats; ++r) out[kBatches + b] = eval(b, cache, y);
    });
  }
  for (auto& t : threads) t.join();
  return out;
}

// Defined in cuda_cases.cu (nvcc).
int cuda_devices();
std::vector<Outcome> run_on_cuda(bool bf16);
std::vector<std::vector<float>> serial_and_concurrent_eval_on_cuda(bool bf16);

}  // namespace moe::gpu_test
