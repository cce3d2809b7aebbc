// One layer, many callers: concurrent eval forwards from several threads,
// each with its own cache, give the serial results bitwise (and run under
// ThreadSanitizer in bash scripts/dev.sh sanitize, which reports any shared
// write); micro-batches in flight (forward A, forward B, backward B, backward
// A) give each micro-batch the outputs and gradients it gets one after the
// other, bitwise, which fails if a backward reads the layer's live state
// instead of its cache's. Every router and estimator.

#include <vector>

#include "support.hpp"

using namespace moe;
using namespace moe::test;

namespace {

constexpr Index kModel = 16, kHidden = 24, kExperts = 6;

// Four batches of different lengths, so that the threads' routings differ.
std::vector<Mat<float>> batches() {
  std::vector<Mat<float>> xs;
  for (Index i = 0; i < 4; ++i) xs.push_back(random_matrix<float>(9 + 13 * i, kModel, 40 + i));
  return xs;
}

router::ReluL1 relu_router() {
  return {.controller = std::make_shared<router::LambdaController>(
              router::LambdaController::for_experts(2, static_cast<int>(kExperts), 1e-3)),
          .k = 2};
}

// Calls check(name, make_router, estimator) for every router x estimator;
// make_router() makes a new router (ReluL1: with a controller of its own).
template <class Check>
void for_each_policy(Check&& check) {
  const auto each_estimator = [&](const char* name, auto make_router) {
    check(name, make_router, estimator::Sparse{});
    check(name, make_router, estimator::DefaultEMA{.beta = 0.8});
    check(name, make_router, estimator::DenseExact{});
  };
  each_estimator("topk", [] { return router::TopK{.k = 2}; });
  each_estimator("relu_l1", relu_router);
  each_estimator("adaptive_cluster", [] { return router::AdaptiveCluster{.k = 2}; });
  each_estimator("random_frozen", [] {
    return router::random_frozen(
        router::schedule::Linear{.k_min = 1, .k_max = 3, .total_steps = 4});
  });
}

// Two training steps, so that the state (EMA, lambda, schedule step) is not
// trivial.

template <class L>
void train_two_steps(L& layer) {
  const auto x = random_matrix<float>(30, kModel, 7), dy = random_matrix<float>(30, kModel, 8);
  Mat<float> y(30, kModel), dx(30, kModel);
  typename L::Cache cache;
  auto grads = layer.make_gradients();
  for (std::uint64_t step = 1; step <= 2; ++step) {
    layer.forward(x, y, cache, Mode::train);
    layer.backward(x, cache, dy, dx, grads);
    layer.end_step(step);
  }
}

}  // namespace

TEST_CASE("concurrent eval forwards on one layer give the serial results bitwise") {
  const auto xs = batches();
  for_each_policy([&](const char* name, auto make_router, auto estimator) {
    CAPTURE(name);
    CAPTURE(decltype(estimator)::kName);
    using L = Layer<decltype(make_router()), decltype(estimator), cpu::Backend<float>, act::GELU>;
    L layer({.d_model = kModel,
             .d_ff = kHidden,
             .experts = kExperts,
             .expert_bias = true,
             .dropout = 0.1},
            make_router(), estimator, 3, cpu::Backend<float>(2));
    train_two_steps(layer);
    std::vector<Mat<float>> serial;
    for (const auto& x : xs) {
      serial.emplace_back(x.rows(), kModel);
      typename L::Cache cache;
      layer.forward(x, serial.back(), cache, Mode::eval);
    }
    const auto state_before = layer.state().flat();
    const std::vector<double> state_copy(state_before.begin(), state_before.end());

    constexpr int kRepeats = 20;
    std::vector<int> mismatches(xs.size(), 0);
    run_together(xs.size(), [&](std::size_t i) {  // all threads forward at once
      typename L::Cache cache;                    // one per thread
      Mat<float> y(xs[i].rows(), kModel);
      for (int repeat = 0; repeat < kRepeats; ++repeat) {
        layer.forward(xs[i], y, cache, Mode::eval);
        mismatches[i] += y != serial[i];
      }
    });
    for (std::size_t i = 0; i < xs.size(); ++i) CHECK(mismatches[i] == 0);
    // Eval forwards change nothing in the layer.
    CHECK(std::equal(state_copy.begin(), state_copy.end(), layer.state().flat().begin()));
  });
}

// Decode batches (a few tokens) with d_ff above the split depth: the second
// product splits each expert's sum over k, with partial sums kept per
// calling thread.
TEST_CASE("concurrent decode forwards (sums split over k) give the serial results bitwise") {
  using L = Layer<router::TopK, estimator::Sparse, cpu::Backend<float>, act::GELU>;
  const Index d_ff = 2 * cpu::Backend<float>::kSplitDepth + 30;
  L layer({.d_model = kModel, .d_ff = d_ff, .experts = kExperts}, router::TopK{.k = 2}, {}, 3,
          cpu::Backend<float>(2));
  std::vector<Mat<float>> xs, serial;
  for (Index i = 0; i < 4; ++i) {
    xs.push_back(random_matrix<float>(1 + 3 * i, kModel, 60 + i));
    serial.emplace_back(xs.back().rows(), kModel);
    typename L::Cache cache;
    layer.forward(xs.back(), serial.back(), cache, Mode::eval);
  }
  std::vector<int> mismatches(xs.size(), 0);
  run_together(xs.size(), [&](std::size_t i) {
    typename L::Cache cache;
    Mat<float> y(xs[i].rows(), kModel);
    for (int repeat = 0; repeat < 20; ++repeat) {
      layer.forward(xs[i], y, cache, Mode::eval);
      mismatches[i] += y != serial[i];
    }
  });
  for (std::size_t i = 0; i < xs.size(); ++i) CHECK(mismatches[i] == 0);
}

TEST_CASE("micro-batches in flight: forward A, forward B, backward B, backward A") {
  const auto xa = random_matrix<float>(23, kModel, 1), xb = random_matrix<float>(17, kModel, 2);
  const auto da = random_matrix<float>(23, kModel, 3), db = random_matrix<float>(17, kModel, 4);
  for_each_policy([&](const char* name, auto make_router, auto estimator) {
    CAPTURE(name);
    CAPTURE(decltype(estimator)::kName);
    using L = Layer<decltype(make_router()), decltype(estimator), cpu::Backend<float>, act::SwiGLU>;
    struct Result {
      Mat<float> ya, yb, dxa, dxb;
      std::vector<float> ga, gb, state;
    };
    const auto run = [&](bool in_flight) {
      L layer({.d_model = kModel, .d_ff = kHidden, .experts = kExperts, .dropout = 0.2},
              make_router(), estimator, 5, cpu::Backend<float>(2));
      train_two_steps(layer);
      Result r{Mat<float>(23, kModel),
               Mat<float>(17, kModel),
               Mat<float>(23, kModel),
               Mat<float>(17, kModel),
               {},
               {},
               {}};
      typename L::Cache ca, cb;
      auto ga = layer.make_gradients(), gb = layer.make_gradients();
      if (in_flight) {
        layer.forward(xa, r.ya, ca, Mode::train);
        layer.forward(xb, r.yb, cb, Mode::train);
        layer.backward(xb, cb, db, r.dxb, gb);
        layer.backward(xa, ca, da, r.dxa, ga);
      } else {  // one after the other
        layer.forward(xa, r.ya, ca, Mode::train);
        layer.backward(xa, ca, da, r.dxa, ga);
        layer.forward(xb, r.yb, cb, Mode::train);
        layer.backward(xb, cb, db, r.dxb, gb);
      }
      r.ga.assign(ga.flat().begin(), ga.flat().end());
      r.gb.assign(gb.flat().begin(), gb.flat().end());
      for (double v : layer.state().flat()) r.state.push_back(static_cast<float>(v));
      return r;
    };
    const Result sequential = run(false), interleaved = run(true);
    CHECK(interleaved.ya == sequential.ya);
    CHECK(interleaved.yb == sequential.yb);
    CHECK(interleaved.dxa == sequential.dxa);
    CHECK(interleaved.dxb == sequential.dxb);
    CHECK(interleaved.ga == sequential.ga);
    CHECK(interleaved.gb == sequential.gb);
    CHECK(interleaved.state == sequential.state);
  });
}
