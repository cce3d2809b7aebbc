// k curricula and SMoE-Dropout's RandomFrozen router (docs/algorithms.md 3.4).

#include <cfenv>

#include "support.hpp"

using namespace moe;
using namespace moe::test;
namespace sched = moe::router::schedule;

TEST_CASE("Linear: round half to even at the boundaries, clipped to [k_min, k_max]") {
  const sched::Linear s{.k_min = 8, .k_max = 16, .total_steps = 16};
  // (16 - 8) t / 16 = t / 2: t = 1 -> 0.5 -> 0, t = 3 -> 1.5 -> 2, t = 5 -> 2.5 -> 2.
  CHECK(s.k_at(0) == 8);
  CHECK(s.k_at(1) == 8);
  CHECK(s.k_at(2) == 9);
  CHECK(s.k_at(3) == 10);
  CHECK(s.k_at(5) == 10);
  CHECK(s.k_at(7) == 12);
  CHECK(s.k_at(15) == 16);  // 7.5 -> 8
  CHECK(s.k_at(16) == 16);
  CHECK(s.k_at(1000) == 16);
  // Independently: the same formula in long double with the FPU's
  // round-to-nearest-even, for many shapes (x.5 quotients are exact there).
  REQUIRE(std::fegetround() == FE_TONEAREST);
  for (int k_min : {1, 2, 8})
    for (int k_max : {k_min, k_min + 1, k_min + 7, 16})
      for (std::uint64_t total : {1u, 2u, 7u, 16u, 1000u})
        for (std::uint64_t t = 0; t <= total + 3; ++t) {
          const sched::Linear lin{.k_min = k_min, .k_max = k_max, .total_steps = total};
          const long double q =
              static_cast<long double>(k_max - k_min) * static_cast<long double>(t) / total;
          int expected = static_cast<int>(std::nearbyintl(q)) + k_min;
          expected = std::clamp(expected, k_min, k_max);
          CAPTURE(k_min);
          CAPTURE(k_max);
          CAPTURE(total);
          CAPTURE(t);
          CHECK(lin.k_at(t) == expected);
        }
}

TEST_CASE("Cosine, Exponential and Step start at k_min, end at k_max, never decrease") {
  const sched::Cosine cosine{.k_min = 8, .k_max = 16, .total_steps = 100};
  const sched::Exponential exponential{.k_min = 8, .k_max = 16, .total_steps = 100};
  const sched::Step step{.k_min = 8, .k_max = 16, .total_steps = 100, .stages = 4};
  CHECK(cosine.k_at(50) == 12);       // 8 + 8 (1 - cos(pi/2)) / 2
  CHECK(exponential.k_at(50) == 11);  // 8 sqrt(2) = 11.31
  CHECK(step.k_at(24) == 8);
  CHECK(step.k_at(25) == 11);  // 8 + 8/3
  CHECK(step.k_at(50) == 13);  // 8 + 16/3
  CHECK(step.k_at(75) == 16);
  for (const auto& k_at : std::initializer_list<std::function<int(std::uint64_t)>>{
           [&](std::uint64_t t) { return cosine.k_at(t); },
           [&](std::uint64_t t) { return exponential.k_at(t); },
           [&](std::uint64_t t) { return step.k_at(t); }}) {
    CHECK(k_at(0) == 8);
    CHECK(k_at(100) == 16);
    CHECK(k_at(10000) == 16);
    for (std::uint64_t t = 1; t <= 100; ++t) CHECK(k_at(t) >= k_at(t - 1));
  }
  CHECK_THROWS_WITH_AS(sched::Linear({.k_min = 4, .k_max = 2}).validate(8),
                       doctest::Contains("(k_min, k_max)=(4, 2)"), Error);
  CHECK_THROWS_WITH_AS(sched::Cosine({.k_min = 1, .k_max = 9}).validate(8),
                       doctest::Contains("experts=8"), Error);
  CHECK_THROWS_WITH_AS(sched::Linear({.k_min = 1, .k_max = 2, .total_steps = 0}).validate(8),
                       doctest::Contains("total_steps=0"), Error);
}

namespace {
template <class Act, class Schedule = sched::Linear>
using Frozen = Layer<router::RandomFrozen<Schedule>, estimator::Sparse, cpu::Backend<double>, Act>;
}

TEST_CASE("RandomFrozen: the SMoE-Dropout preset, the curriculum, and its state") {
  using L = Frozen<act::ReLU>;
  L layer({.d_model = 8, .d_ff = 6, .experts = 8, .expert_bias = true},
          router::random_frozen(sched::Linear{.k_min = 2, .k_max = 8, .total_steps = 6}), {}, 4);
  const auto& specs = layer.parameters().layout();
  CHECK_FALSE(specs.at("router.weight").trainable);
  CHECK_FALSE(specs.at("router.bias").trainable);
  CHECK(layer.router().k() == 2);
  const auto x = random_matrix<double>(20, 8, 1), dy = random_matrix<double>(20, 8, 2);
  Mat<double> y(20, 8), dx(20, 8);
  L::Cache cache;
  layer.forward(x, y, cache, Mode::train);
  CHECK(cache.stats().aux_loss == 0);
  CHECK(cache.stats().selected_pairs == 40);
  auto grads = layer.make_gradients();
  layer.backward(x, cache, dy, dx, grads);
  for (double g : grads["router.weight"]) CHECK(g == 0);
  CHECK(dx.norm() > 0);
  // k(t) = clip(round_half_even(6 t / 6) + 2): one more expert per step.
  for (std::uint64_t t = 1; t <= 6; ++t) {
    layer.end_step(t);
    CHECK(layer.router().k() == static_cast<int>(2 + t));
    CHECK(layer.state()["router.step"][0] == static_cast<double>(t));
  }
  // A checkpoint's step restores k.
  L fresh({.d_model = 8, .d_ff = 6, .experts = 8, .expert_bias = true},
          router::random_frozen(sched::Linear{.k_min = 2, .k_max = 8, .total_steps = 6}), {}, 4);
  auto state = layer.state();
  state["router.step"][0] = 3;
  fresh.load_state(state);
  CHECK(fresh.router().k() == 5);
  // Self-slimming: inference at any k in 1..E.
  for (int k = 1; k <= 8; ++k) {
    layer.router().set_k(k);
    layer.forward(x, y, cache, Mode::eval);
    CHECK(cache.stats().selected_pairs == 20 * k);
  }
  // set_k is for inference: training still follows the schedule (k = 8 after
  // 6 steps here, so make it visible by rolling back to step 1, k = 3).
  layer.router().set_k(1);
  auto rollback = layer.state();
  rollback["router.step"][0] = 1;
  layer.load_state(rollback);
  layer.forward(x, y, cache, Mode::train);
  CHECK(cache.stats().selected_pairs == 20 * 3);
  layer.forward(x, y, cache, Mode::eval);
  CHECK(cache.stats().selected_pairs == 20 * 1);
  layer.router().set_k(9);
  CHECK_THROWS_WITH_AS(layer.forward(x, y, cache, Mode::eval), doctest::Contains("k=9"), Error);
}

TEST_CASE_TEMPLATE("RandomFrozen backward matches finite differences", Act, act::ReLU, act::GELU,
                   act::SwiGLU) {
  for (int k : {1, 3, 5}) {
    CAPTURE(k);
    Frozen<Act, sched::Constant> layer(
        {.d_model = 5, .d_ff = 4, .experts = 5, .expert_bias = Act::kSupportsBias},
        router::random_frozen(sched::Constant{k}), {}, 6);
    // A larger random router so the softmax over the selected is not flat.
    for (auto& w : layer.parameters()["router.weight"]) w *= 30;
    const auto x = random_matrix<double>(7, 5, 1), r = random_matrix<double>(7, 5, 2);
    for (const auto& report : check_gradients(layer, x, r, Mode::eval)) {
      CAPTURE(report.block);
      CAPTURE(report.relative());
      CHECK(report.passes());
    }
  }
}
