// ReMoE's ReLU router with adaptive L1 (docs/algorithms.md 3.2): finite differences
// with the L1 term, its value on a hand-computed case, the lambda trajectory,
// and tokens that use no expert.

#include "support.hpp"

using namespace moe;
using namespace moe::test;

namespace {

template <class Act, class Estimator = estimator::Sparse>
using L = Layer<router::ReluL1, Estimator, cpu::Backend<double>, Act>;

std::shared_ptr<router::LambdaController> controller(double lambda, double target = 0.5) {
  return std::make_shared<router::LambdaController>(
      router::LambdaController::Options{.target_sparsity = target, .initial_lambda = lambda});
}

}  // namespace

TEST_CASE_TEMPLATE("ReluL1 backward (L1 term included) matches finite differences", Act, act::ReLU,
                   act::GELU, act::SwiGLU) {
  for (const double lambda : {1e-8, 0.3}) {
    for (const Index T : {Index{1}, Index{9}}) {
      CAPTURE(lambda);
      CAPTURE(T);
      L<Act> layer({.d_model = 5, .d_ff = 4, .experts = 4},
                   router::ReluL1{.controller = controller(lambda), .k = 2, .init_std = 0.5}, {},
                   13);
      auto x = random_matrix<double>(T, 5, 2);
      if (T > 1) {  // token 3 gets no expert: every logit is about -6, far from the kink
        auto w = layer.parameters().matrix("router.weight");
        for (Index e = 0; e < 4; ++e) w(e, 0) += 2.0;
        x(3, 0) = -3.0;
      }
      const auto r = random_matrix<double>(T, 5, 3);
      for (const auto& report : check_gradients(layer, x, r, Mode::train)) {
        CAPTURE(report.block);
        CAPTURE(report.relative());
        CHECK(report.passes());
      }
      if (T > 1) {
        typename L<Act>::Cache cache;
        Mat<double> y(T, 5);
        layer.forward(x, y, cache, Mode::eval);
        CHECK(cache.top1_assignment()[3] == -1);
        CHECK(y.row(3).norm() == 0);
      }
    }
  }
}

TEST_CASE("ReluL1: gates, variable experts per token, the L1 value on a hand-computed case") {
  // W_r = I (d = E = 3): z = x. lambda = 0.1, k = 1, T = 3:
  //   t0: z = [1, -1, 2]    G = [1, 0, 2]     A = {2, 0} (largest first)
  //   t1: z = [-1, -2, -3]  G = 0             A = {}    -> y = 0
  //   t2: z = [.5, .5, -1]  G = [.5, .5, 0]   A = {0, 1} (tie: lower index first)
  // n = [2, 1, 1], sum_t G = [1.5, .5, 2]:
  // L1 = 0.1 * 3 / (1 * 9) * (2 * 1.5 + 1 * .5 + 1 * 2) = 0.55 / 3.
  auto ctl = controller(0.1, 2.0 / 3.0);
  L<act::GELU> layer({.d_model = 3, .d_ff = 2, .experts = 3},
                     router::ReluL1{.controller = ctl, .k = 1}, {}, 1);
  auto w = layer.parameters().matrix("router.weight");
  for (Index e = 0; e < 3; ++e)
    for (Index j = 0; j < 3; ++j) w(e, j) = e == j ? 1 : 0;
  Mat<double> x(3, 3), y(3, 3);
  x << 1, -1, 2, -1, -2, -3, .5, .5, -1;
  L<act::GELU>::Cache cache;
  layer.forward(x, y, cache, Mode::train);
  CHECK(cache.stats().aux_loss == doctest::Approx(0.55 / 3).epsilon(1e-14));
  CHECK(cache.stats().selected_pairs == 4);
  CHECK(cache.stats().zero_gate_fraction == doctest::Approx(5.0 / 9.0));
  CHECK(cache.stats().tokens_per_expert == std::vector<Index>{2, 1, 1});
  CHECK(std::vector<int>(cache.top1_assignment().begin(), cache.top1_assignment().end()) ==
        std::vector<int>{2, -1, 0});
  CHECK(y.row(1).norm() == 0);  // no expert: zero output, no special case
  CHECK(y.row(0).norm() > 0);
  // Eval forwards apply no L1 and record no sparsity.
  const double pending = ctl->pending_sparsity();
  layer.forward(x, y, cache, Mode::eval);
  CHECK(cache.stats().aux_loss == 0);
  CHECK(ctl->pending_sparsity() == pending);
}

TEST_CASE("LambdaController: the lambda trajectory over a scripted sparsity sequence") {
  router::LambdaController c({.target_sparsity = 0.75, .initial_lambda = 1e-8});
  c.record(0.5);
  c.record(0.6);  // mean 0.55 < 0.75: lambda grows
  c.end_step(0);
  CHECK(c.lambda() == doctest::Approx(1.2e-8).epsilon(1e-12));
  c.end_step(0);  // a second layer's call for the same step does nothing
  CHECK(c.lambda() == doctest::Approx(1.2e-8).epsilon(1e-12));
  c.record(0.8);  // above the target: lambda shrinks
  c.end_step(1);
  CHECK(c.lambda() == doctest::Approx(1e-8).epsilon(1e-12));
  c.end_step(2);  // no training forward in this step: unchanged
  CHECK(c.lambda() == doctest::Approx(1e-8).epsilon(1e-12));
  c.record(0.75);  // at the target: "else" branch, shrinks
  c.end_step(3);
  CHECK(c.lambda() == doctest::Approx(1e-8 / 1.2).epsilon(1e-12));
  for (int i = 0; i < 10; ++i) {  // far from the clamp: ten steps below target multiply by 1.2^10
    c.record(0.0);
    c.end_step(4 + i);
  }
  CHECK(c.lambda() == doctest::Approx(1e-8 / 1.2 * std::pow(1.2, 10)).epsilon(1e-12));
  CHECK(router::LambdaController::for_experts(2, 8).target_sparsity() == 0.75);
  CHECK(router::LambdaController::for_experts(8, 8).target_sparsity() == 0);
  CHECK_THROWS_AS(router::LambdaController::for_experts(9, 8), Error);
}

TEST_CASE("ReluL1 layers share one lambda; it is part of each layer's state") {
  auto ctl = controller(1e-3, 0.75);
  const router::ReluL1 relu{.controller = ctl, .k = 1, .init_std = 0.5};
  L<act::ReLU> a({.d_model = 4, .d_ff = 3, .experts = 4}, relu, {}, 1);
  L<act::ReLU> b({.d_model = 4, .d_ff = 3, .experts = 4}, relu, {}, 2);
  CHECK(a.state()["router.lambda"][0] == 1e-3);
  const auto x = random_matrix<double>(16, 4, 5);
  Mat<double> y(16, 4);
  L<act::ReLU>::Cache ca, cb;
  a.forward(x, y, ca, Mode::train);
  b.forward(x, y, cb, Mode::train);
  const double sparsity = (ca.stats().zero_gate_fraction + cb.stats().zero_gate_fraction) / 2;
  CHECK(ctl->pending_sparsity() == doctest::Approx(sparsity));
  REQUIRE(sparsity < 0.75);  // dense at init: lambda must grow, once
  a.end_step(0);
  b.end_step(0);
  CHECK(ctl->lambda() == doctest::Approx(1.2e-3));
  CHECK(a.state()["router.lambda"][0] == doctest::Approx(1.2e-3));
  CHECK(b.state()["router.lambda"][0] == doctest::Approx(1.2e-3));
  // Restoring a checkpoint's state restores the shared lambda.
  const auto saved = a.state();
  a.forward(x, y, ca, Mode::train);
  a.end_step(1);
  CHECK(ctl->lambda() != doctest::Approx(1.2e-3));
  a.load_state(saved);
  CHECK(ctl->lambda() == doctest::Approx(1.2e-3));
}

TEST_CASE("ReluL1 bad input") {
  using Layer = L<act::ReLU>;
  CHECK_THROWS_WITH_AS(
      Layer({.d_model = 4, .d_ff = 3, .experts = 4}, router::ReluL1{.controller = nullptr, .k = 1}),
      doctest::Contains("controller=nullptr"), Error);
  CHECK_THROWS_WITH_AS(Layer({.d_model = 4, .d_ff = 3, .experts = 4},
                             router::ReluL1{.controller = controller(1), .k = 5}),
                       doctest::Contains("k=5"), Error);
  CHECK_THROWS_WITH_AS(router::LambdaController({.target_sparsity = 1.0}),
                       doctest::Contains("target_sparsity=1"), Error);
}

TEST_CASE("ReluL1's k must match its controller's target, and a restore replays cleanly") {
  using Layer = L<act::ReLU>;
  CHECK_THROWS_WITH_AS(
      Layer({.d_model = 4, .d_ff = 3, .experts = 8},
            router::ReluL1{.controller = std::make_shared<router::LambdaController>(
                               router::LambdaController::for_experts(1, 8)),
                           .k = 2}),
      doctest::Contains("expected 1 - k/E = 0.75"), Error);
  // Roll back one step and replay it: lambda must follow the same path.
  router::LambdaController c({.target_sparsity = 0.75, .initial_lambda = 1e-3});
  c.record(0.5);
  c.end_step(1);
  const double after_one = c.lambda();
  c.record(0.5);
  c.end_step(2);
  const double after_two = c.lambda();
  c.record(0.9);            // a forward of step 3 that the rollback discards
  c.set_lambda(after_one);  // restore the checkpoint taken after step 1
  c.record(0.5);
  c.end_step(2);  // replayed: must update again, from the restored lambda
  CHECK(c.lambda() == doctest::Approx(after_two).epsilon(1e-15));
}

TEST_CASE("LambdaController: lambda is clamped to [kMinLambda, kMaxLambda], and restores there") {
  using C = router::LambdaController;
  CHECK(C::kMinLambda == 1e-30);
  CHECK(C::kMaxLambda == 1e30);
  // Sparsity stuck below the target: lambda reached Inf after ~4000 steps,
  // and the layer then refused its own state ("router.lambda[0]=inf").
  auto ctl = controller(1e-8, 0.75);
  L<act::ReLU> layer({.d_model = 4, .d_ff = 3, .experts = 4},
                     router::ReluL1{.controller = ctl, .k = 1}, {}, 1);
  for (std::uint64_t step = 0; step < 5000; ++step) {
    ctl->record(0.0);
    layer.end_step(step);
  }
  CHECK(ctl->lambda() == C::kMaxLambda);
  CHECK(layer.state()["router.lambda"][0] == C::kMaxLambda);
  CHECK_NOTHROW(layer.load_state(layer.state()));
  // Stuck above it: lambda no longer underflows towards 0, and grows back.
  for (std::uint64_t step = 0; step < 5000; ++step) {
    ctl->record(1.0);
    layer.end_step(step);
  }
  CHECK(ctl->lambda() == C::kMinLambda);
  CHECK_NOTHROW(layer.load_state(layer.state()));
  ctl->record(0.0);
  layer.end_step(0);
  CHECK(ctl->lambda() == C::kMinLambda * 1.2);
  // A huge factor jumps to the bound, not to Inf or 0.
  C jump({.target_sparsity = 0.5, .initial_lambda = 1.0, .factor = 1e300});
  jump.record(0.0);
  jump.end_step(0);
  CHECK(jump.lambda() == C::kMaxLambda);
  jump.record(1.0);
  jump.end_step(1);
  CHECK(jump.lambda() == C::kMinLambda);
  // set_lambda and the constructor take exactly the clamp's range.
  CHECK_NOTHROW(jump.set_lambda(C::kMinLambda));
  CHECK_NOTHROW(jump.set_lambda(C::kMaxLambda));
  CHECK_THROWS_WITH_AS(jump.set_lambda(1e31), doctest::Contains("lambda=1e+31"), Error);
  CHECK_THROWS_WITH_AS(jump.set_lambda(1e-31), doctest::Contains("in [1e-30, 1e+30]"), Error);
  CHECK(jump.lambda() == C::kMaxLambda);
  CHECK_THROWS_WITH_AS(C({.initial_lambda = 1e-40}),
                       doctest::Contains("initial_lambda=1e-40, expected a finite value > 0 in "
                                         "[1e-30, 1e+30]"),
                       Error);
}
