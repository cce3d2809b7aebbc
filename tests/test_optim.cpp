// The examples' optimizers against their update equations.

#include "support.hpp"

using namespace moe;

namespace {
TensorBuffer<double> buffer(std::initializer_list<double> values) {
  auto layout = std::make_shared<TensorLayout>();
  layout->add("w", {static_cast<Index>(values.size())});
  TensorBuffer<double> b(layout);
  std::copy(values.begin(), values.end(), b.flat().begin());
  return b;
}
}  // namespace

TEST_CASE("AdamW: first step moves each weight by lr * (sign(g) + wd * p)") {
  auto p = buffer({1.0, -2.0});
  auto g = p.zeros_like();
  g.flat()[0] = 0.5;
  g.flat()[1] = -3.0;
  optim::AdamW opt({.lr = 0.1, .weight_decay = 0.01});
  opt.step(p, g);
  // Bias-corrected m/sqrt(v) is g/|g| on the first step (up to eps).
  CHECK(p.flat()[0] == doctest::Approx(1.0 - 0.1 * (1.0 + 0.01 * 1.0)));
  CHECK(p.flat()[1] == doctest::Approx(-2.0 - 0.1 * (-1.0 + 0.01 * -2.0)));
  CHECK(opt.steps() == 1);
}

TEST_CASE("SGD with momentum") {
  auto p = buffer({1.0});
  auto g = p.zeros_like();
  g.flat()[0] = 2.0;
  optim::Sgd opt({.lr = 0.1, .momentum = 0.5});
  opt.step(p, g);  // v = 2, p = 1 - 0.2
  CHECK(p.flat()[0] == doctest::Approx(0.8));
  opt.step(p, g);  // v = 0.5 * 2 + 2 = 3, p = 0.8 - 0.3
  CHECK(p.flat()[0] == doctest::Approx(0.5));
  auto other = buffer({1.0, 2.0});
  CHECK_THROWS_AS(opt.step(p, other), Error);
}

TEST_CASE("optimizers leave non-trainable tensors (a frozen router) untouched") {
  Layer<router::TopK, estimator::Sparse, cpu::Backend<double>, act::GELU> layer(
      {.d_model = 4, .d_ff = 3, .experts = 3}, router::TopK{.k = 1, .bias = true, .frozen = true});
  CHECK_FALSE(layer.parameters().layout().at("router.weight").trainable);
  CHECK(layer.parameters().layout().at("experts.w1").trainable);
  const auto router_before = std::vector<double>(layer.parameters()["router.weight"].begin(),
                                                 layer.parameters()["router.weight"].end());
  const auto w1_before = std::vector<double>(layer.parameters()["experts.w1"].begin(),
                                             layer.parameters()["experts.w1"].end());
  auto grads = layer.make_gradients();
  for (auto& g : grads.flat()) g = 1.0;  // even a non-zero gradient must not move them
  optim::AdamW adamw({.lr = 0.1, .weight_decay = 0.1});
  optim::Sgd sgd({.lr = 0.1, .momentum = 0.9});
  adamw.step(layer.parameters(), grads);
  sgd.step(layer.parameters(), grads);
  const auto router_after = layer.parameters()["router.weight"];
  CHECK(std::equal(router_before.begin(), router_before.end(), router_after.begin()));
  const auto w1_after = layer.parameters()["experts.w1"];
  CHECK_FALSE(std::equal(w1_before.begin(), w1_before.end(), w1_after.begin()));
}

TEST_CASE("AdamW: restoring steps and moments continues bitwise identically") {
  auto p = buffer({1.0, -2.0, 0.5});
  auto g = p.zeros_like();
  optim::AdamW straight({.lr = 0.05, .weight_decay = 0.1});
  auto set_grad = [&](int step) {
    for (std::size_t i = 0; i < 3; ++i) g.flat()[i] = std::sin(1.0 + step + 2.0 * i);
  };
  for (int s = 0; s < 3; ++s) set_grad(s), straight.step(p, g);
  auto q = p;  // the checkpoint: parameters, steps and moments after 3 steps
  optim::AdamW resumed({.lr = 0.05, .weight_decay = 0.1});
  resumed.restore(straight.steps(), straight.first_moment(), straight.second_moment());
  for (int s = 3; s < 6; ++s) {
    set_grad(s);
    straight.step(p, g);
    resumed.step(q, g);
  }
  CHECK(std::equal(p.flat().begin(), p.flat().end(), q.flat().begin()));
  CHECK(resumed.steps() == 6);

  // Bad state: mismatched moments, a negative second moment, another buffer.
  const std::vector<double> two(2, 0.0), three(3, 0.0), negative{0.0, -1.0, 0.0};
  CHECK_THROWS_WITH_AS(resumed.restore(1, two, three), doctest::Contains("m.size()=2"), Error);
  CHECK_THROWS_WITH_AS(resumed.restore(1, three, negative), doctest::Contains("-1"), Error);
  auto other = buffer({1.0, 2.0});
  CHECK_THROWS_WITH_AS(resumed.step(other, other.zeros_like()),
                       doctest::Contains("one AdamW per parameter buffer"), Error);
}
