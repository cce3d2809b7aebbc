// Every router x every estimator x every activation compiles, runs and is
// gradient-checked; where an estimator adds nothing it equals Sparse; and the
// state of every stateful policy round-trips through a checkpoint so that the
// next training step is bitwise identical.

#include "support.hpp"

using namespace moe;
using namespace moe::test;
namespace sched = moe::router::schedule;

namespace {

const LayerConfig kConfig{.d_model = 5, .d_ff = 4, .experts = 4};

router::TopK topk() { return {.k = 2, .bias = true, .aux_coef = 0.05, .init_std = 0.7}; }
router::ReluL1 relu() {
  return {.controller = std::make_shared<router::LambdaController>(
              router::LambdaController::Options{.target_sparsity = 0.5, .initial_lambda = 0.1}),
          .k = 2,
          .init_std = 0.5};
}
router::AdaptiveCluster cluster() { return {.k = 2, .init_gain = 3.0}; }
router::RandomFrozen<sched::Constant> frozen() {
  auto r = router::random_frozen(sched::Constant{2});
  r.router().init_std = 0.5;
  return r;
}

// dense_gates: the router's gates are non-zero off the selection (TopK's
// plain softmax). DenseExact then returns the dense mixture's router
// gradient by design, not its own forward's: there only the expert blocks are
// compared (test_estimators checks its router gradient against the dense
// mixture's).
template <class Router, class Estimator, class Act>
void check_combination(const Router& router, const Estimator& estimator, bool dense_gates) {
  using L = Layer<Router, Estimator, cpu::Backend<double>, Act>;
  L layer(kConfig, router, estimator, 31);
  if constexpr (std::is_same_v<Estimator, estimator::DefaultEMA>) {
    auto ema = layer.state()["estimator.ema"];
    for (std::size_t i = 0; i < ema.size(); ++i) ema[i] = 2 * math::uniform01(2, 3, i) - 1;
  }
  const auto x = random_matrix<double>(6, 5, 1), r = random_matrix<double>(6, 5, 2);
  for (const Mode mode : {Mode::eval, Mode::train}) {
    // A training forward updates the EMA (state without gradient): only eval
    // holds it fixed; the other estimators are checked in both modes.
    if (mode == Mode::train && std::is_same_v<Estimator, estimator::DefaultEMA>) continue;
    for (const auto& report : check_gradients(layer, x, r, mode)) {
      const bool oracle_block = report.block == "dx" || report.block.rfind("router.", 0) == 0;
      if (std::is_same_v<Estimator, estimator::DenseExact> && dense_gates && oracle_block) continue;
      CAPTURE(std::string(Router::kName));
      CAPTURE(std::string(Estimator::kName));
      CAPTURE(report.block);
      CAPTURE(report.relative());
      CHECK(report.passes());
    }
  }
}

template <class Act, class Router>
void check_all_estimators(const Router& router, bool dense_gates = false) {
  check_combination<Router, estimator::Sparse, Act>(router, {}, dense_gates);
  check_combination<Router, estimator::DefaultEMA, Act>(router, {.beta = 0.9}, dense_gates);
  check_combination<Router, estimator::DenseExact, Act>(router, {}, dense_gates);
}

// DefaultEMA with gates that are zero off A_t adds nothing: outputs and
// gradients equal Sparse's exactly.
template <class Router>
void check_ema_adds_nothing(const Router& router) {
  using WithEma = Layer<Router, estimator::DefaultEMA, cpu::Backend<double>, act::GELU>;
  using Plain = Layer<Router, estimator::Sparse, cpu::Backend<double>, act::GELU>;
  WithEma a(kConfig, router, {.beta = 0.5}, 4);
  Plain b(kConfig, router, {}, 4);
  const auto x = random_matrix<double>(9, 5, 1), dy = random_matrix<double>(9, 5, 2);
  Mat<double> ya(9, 5), yb(9, 5), dxa(9, 5), dxb(9, 5);
  typename WithEma::Cache ca;
  typename Plain::Cache cb;
  a.forward(x, ya, ca, Mode::train);  // trains the EMA: it is non-zero now
  a.forward(x, ya, ca, Mode::train);
  b.forward(x, yb, cb, Mode::train);
  b.forward(x, yb, cb, Mode::train);
  double ema_norm = 0;
  for (double v : a.state()["estimator.ema"]) ema_norm += v * v;
  CHECK(ema_norm > 0);
  auto ga = a.make_gradients();
  auto gb = b.make_gradients();
  a.backward(x, ca, dy, dxa, ga);
  b.backward(x, cb, dy, dxb, gb);
  CAPTURE(std::string(Router::kName));
  CHECK(ya == yb);
  CHECK(dxa == dxb);
  CHECK(std::equal(ga.flat().begin(), ga.flat().end(), gb.flat().begin()));
}

}  // namespace

TEST_CASE_TEMPLATE("every router x estimator x activation matches finite differences", Act,
                   act::ReLU, act::GELU, act::SwiGLU) {
  check_all_estimators<Act>(topk(), /*dense_gates=*/true);
  check_all_estimators<Act>(relu());
  check_all_estimators<Act>(cluster());
  check_all_estimators<Act>(frozen());
}

TEST_CASE("DefaultEMA equals Sparse where gates are zero off the selection") {
  check_ema_adds_nothing(relu());
  check_ema_adds_nothing(cluster());  // softmax over the selected
  check_ema_adds_nothing(frozen());   // softmax over the selected
  check_ema_adds_nothing(router::TopK{.k = 2, .softmax_over_selected = true});
}

namespace {

// Train `steps` steps (dropout on, SGD, end_step), from `layer`'s current state.
template <class L>
std::pair<Mat<double>, std::vector<double>> train(L& layer, int first_step, int steps,
                                                  const ForwardContext& ctx = {}) {
  Mat<double> y(12, 5), dx(12, 5);
  auto grads = layer.make_gradients();
  optim::Sgd sgd({.lr = 0.05});
  for (int s = first_step; s < first_step + steps; ++s) {
    const auto x = random_matrix<double>(12, 5, 100 + static_cast<std::uint64_t>(s));
    const auto dy = random_matrix<double>(12, 5, 200 + static_cast<std::uint64_t>(s));
    typename L::Cache cache;
    layer.forward(x, y, cache, Mode::train, ctx);
    grads.set_zero();
    layer.backward(x, cache, dy, dx, grads);
    sgd.step(layer.parameters(), grads);
    layer.end_step(static_cast<std::uint64_t>(s + 1));
  }
  return {y, std::vector<double>(grads.flat().begin(), grads.flat().end())};
}

template <class Router, class Estimator>
void check_checkpoint(const Router& original, const Router& fresh, const Estimator& est,
                      const ForwardContext& ctx = {}) {
  using L = Layer<Router, Estimator, cpu::Backend<double>, act::GELU>;
  const LayerConfig cfg{.d_model = 5, .d_ff = 4, .experts = 4, .dropout = 0.2};
  L layer(cfg, original, est, 77);
  train(layer, 0, 3, ctx);
  const auto params = layer.parameters();  // the checkpoint: parameters and state
  const auto state = layer.state();
  const auto expected = train(layer, 3, 2, ctx);

  L restored(cfg, fresh, est, /*another seed*/ 5);
  std::copy(params.flat().begin(), params.flat().end(), restored.parameters().flat().begin());
  restored.load_state(state);
  const auto got = train(restored, 3, 2, ctx);
  CAPTURE(std::string(Router::kName));
  CAPTURE(std::string(Estimator::kName));
  CHECK(got.first == expected.first);
  CHECK(got.second == expected.second);
}

}  // namespace

TEST_CASE("a checkpoint (parameters + state) resumes training bitwise identically") {
  check_checkpoint(topk(), topk(), estimator::DefaultEMA{.beta = 0.9});
  check_checkpoint(topk(), topk(), estimator::Sparse{});
  // The ReLU router's lambda lives in a shared controller: the restored layer
  // has a fresh one, and load_state hands it the checkpoint's lambda.
  check_checkpoint(relu(), relu(), estimator::Sparse{});
  const std::vector<int> previous{0, 1, 2, 3, 0, 1, 2, 3, 0, 0, 1, -1};
  check_checkpoint(cluster(), cluster(), estimator::Sparse{},
                   ForwardContext{.previous_assignment = previous});
  const auto curriculum =
      router::random_frozen(sched::Linear{.k_min = 1, .k_max = 4, .total_steps = 4});
  check_checkpoint(curriculum, curriculum, estimator::DefaultEMA{.beta = 0.5});
}

TEST_CASE("each paper's alias builds with its defaults") {
  using B = cpu::Backend<float>;
  DefaultMoELayer<B> default_moe({.d_model = 8, .d_ff = 16, .experts = 8}, router::TopK{.k = 1},
                                 estimator::DefaultEMA{}, 1);
  ReMoELayer<B> remoe({.d_model = 8, .d_ff = 16, .experts = 8},
                      router::ReluL1{.controller = std::make_shared<router::LambdaController>(
                                         router::LambdaController::for_experts(2, 8))},
                      {}, 1);
  ACMoELayer<B> acmoe({.d_model = 8, .d_ff = 16, .experts = 16, .expert_bias = true}, {}, {}, 1);
  SMoEDropoutLayer<B> smoe_dropout(
      {.d_model = 8, .d_ff = 16, .experts = 16, .expert_bias = true, .dropout = 0.1},
      router::random_frozen(sched::Linear{.k_min = 8, .k_max = 16, .total_steps = 100}), {}, 1);
  CHECK(default_moe.estimator().beta == 0.9);
  CHECK(remoe.router().controller->lambda() == 1e-8);
  CHECK(acmoe.router().k == 2);
  CHECK(smoe_dropout.router().k() == 8);
  const Mat<float> x = random_matrix<float>(10, 8, 1);
  Mat<float> y(10, 8);
  SMoEDropoutLayer<B>::Cache cache;
  smoe_dropout.forward(x, y, cache, Mode::train);
  CHECK(cache.stats().selected_pairs == 80);
}
