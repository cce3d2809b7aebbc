// The examples' optimizers against their update equations.

#include <limits>

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

namespace {
// The optimiser state a test can see: the weights, and AdamW's step count and moments.
std::vector<double> values(const TensorBuffer<double>& b) {
  return {b.flat().begin(), b.flat().end()};
}
std::vector<double> moments(const optim::AdamW& opt) {
  std::vector<double> out(opt.first_moment().begin(), opt.first_moment().end());
  out.insert(out.end(), opt.second_moment().begin(), opt.second_moment().end());
  out.push_back(static_cast<double>(opt.steps()));
  return out;
}
}  // namespace

TEST_CASE("AdamW and Sgd refuse a non-finite gradient before changing anything") {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  auto p = buffer({1.0, -2.0, 0.5});
  auto g = p.zeros_like();
  g.flat()[0] = 0.25;
  optim::AdamW adamw({.lr = 0.1});
  adamw.step(p, g);
  optim::Sgd sgd({.lr = 0.1, .momentum = 0.5});
  sgd.step(p, g);
  const auto p_before = values(p);
  const auto adamw_before = moments(adamw);
  for (double bad : {nan, inf, -inf}) {
    auto poisoned = g;
    poisoned.flat()[2] = bad;
    CAPTURE(bad);
    // Once in m and v, a NaN stayed there: restore() then refused the
    // optimiser's own saved moments.
    CHECK_THROWS_WITH_AS(adamw.step(p, poisoned), doctest::Contains("grads 'w'[2]="), Error);
    CHECK_THROWS_WITH_AS(sgd.step(p, poisoned), doctest::Contains("grads 'w'[2]="), Error);
    CHECK(values(p) == p_before);
    CHECK(moments(adamw) == adamw_before);
  }
  auto nan_grads = g;
  nan_grads.flat()[1] = nan;
  CHECK_THROWS_WITH_AS(adamw.step(p, nan_grads),
                       doctest::Contains("grads 'w'[1]=nan, expected finite values"), Error);
  // A finite gradient whose square overflows would make v Inf.
  auto huge = g;
  huge.flat()[0] = 1e200;
  CHECK_THROWS_WITH_AS(adamw.step(p, huge), doctest::Contains("grads 'w'[0]=1e+200"), Error);
  CHECK(moments(adamw) == adamw_before);
  // Both go on as if the bad steps had not been tried.
  auto q = buffer({1.0, -2.0, 0.5});
  optim::AdamW adamw_ref({.lr = 0.1});
  optim::Sgd sgd_ref({.lr = 0.1, .momentum = 0.5});
  adamw_ref.step(q, g), sgd_ref.step(q, g), adamw_ref.step(q, g), sgd_ref.step(q, g);
  adamw.step(p, g), sgd.step(p, g);
  CHECK(values(p) == values(q));
  // A frozen tensor's gradient is never read, so it is not checked either.
  auto layout = std::make_shared<TensorLayout>();
  layout->add("frozen", {1}, false);
  layout->add("w", {1});
  TensorBuffer<double> f(layout);
  auto fg = f.zeros_like();
  fg["frozen"][0] = nan;
  CHECK_NOTHROW(optim::AdamW().step(f, fg));
  CHECK_NOTHROW(optim::Sgd().step(f, fg));
}

TEST_CASE("AdamW: a step count of 2^53 or more is refused, and never wraps") {
  auto p = buffer({1.0, -2.0});
  auto g = p.zeros_like();
  g.flat()[0] = 1.0;
  optim::AdamW opt({.lr = 0.1});
  opt.step(p, g);
  const auto before = moments(opt);
  const std::vector<double> m{0.1, 0.2}, v{0.01, 0.04};
  // UINT64_MAX made ++steps wrap to 0: 1 - beta^0 = 0, and every weight NaN.
  CHECK_THROWS_WITH_AS(opt.restore(std::numeric_limits<std::uint64_t>::max(), m, v),
                       doctest::Contains("steps=18446744073709551615, expected < 2^53"), Error);
  CHECK_THROWS_WITH_AS(opt.restore(std::uint64_t{1} << 53, m, v),
                       doctest::Contains("steps=9007199254740992"), Error);
  CHECK(moments(opt) == before);
  // The largest count restore() takes: a step past it is refused, not wrapped.
  opt.restore((std::uint64_t{1} << 53) - 1, m, v);
  const auto p_before = values(p);
  CHECK_THROWS_WITH_AS(opt.step(p, g), doctest::Contains("steps()=9007199254740991"), Error);
  CHECK(values(p) == p_before);
  CHECK(opt.steps() == (std::uint64_t{1} << 53) - 1);
  // One below it steps, and its state restores.
  opt.restore((std::uint64_t{1} << 53) - 2, m, v);
  opt.step(p, g);
  for (double w : values(p)) CHECK(std::isfinite(w));
  CHECK_NOTHROW(opt.restore(opt.steps(), opt.first_moment(), opt.second_moment()));
}

TEST_CASE("AdamW and Sgd: another buffer of the same size is named as such; reset() rebinds") {
  auto p = buffer({1.0, -2.0});
  auto g = p.zeros_like();
  g.flat()[0] = 1.0;
  optim::AdamW adamw({.lr = 0.1});
  optim::Sgd sgd({.lr = 0.1, .momentum = 0.5});
  adamw.step(p, g);
  sgd.step(p, g);
  auto copy = p;  // same size and layout, another buffer
  const auto copy_before = values(copy);
  CHECK_THROWS_WITH_AS(adamw.step(copy, g), doctest::Contains("another buffer of the same size"),
                       Error);
  CHECK_THROWS_WITH_AS(sgd.step(copy, g), doctest::Contains("another buffer of the same size"),
                       Error);
  CHECK(values(copy) == copy_before);
  // reset() forgets the moments, the velocity and the buffer: a fresh optimiser.
  adamw.reset();
  sgd.reset();
  CHECK(adamw.steps() == 0);
  CHECK(adamw.first_moment().empty());
  auto ref = copy;
  optim::AdamW adamw_ref({.lr = 0.1});
  optim::Sgd sgd_ref({.lr = 0.1, .momentum = 0.5});
  adamw.step(copy, g), sgd.step(copy, g), adamw.step(copy, g), sgd.step(copy, g);
  adamw_ref.step(ref, g), sgd_ref.step(ref, g), adamw_ref.step(ref, g), sgd_ref.step(ref, g);
  CHECK(values(copy) == values(ref));
  CHECK(adamw.steps() == 2);
  // Now bound to the copy: the first buffer is the other one.
  CHECK_THROWS_WITH_AS(adamw.step(p, g), doctest::Contains("another buffer of the same size"),
                       Error);
  // A restore()'s moments bind to any buffer of their size, and name the size otherwise.
  adamw.restore(1, std::vector<double>{0.1, 0.2, 0.3}, std::vector<double>{0.0, 0.0, 0.0});
  CHECK_THROWS_WITH_AS(adamw.step(p, g), doctest::Contains("params of size 2"), Error);
}

TEST_CASE("TensorLayout::add: a negative dimension is named as such") {
  TensorLayout layout;
  CHECK_THROWS_WITH_AS(layout.add("w", {2, -1}),
                       "moe::TensorLayout::add: 'w' of shape (2, -1): dimension 1 = -1, expected "
                       ">= 0",
                       Error);
  CHECK_THROWS_WITH_AS(layout.add("w", {-3}), doctest::Contains("dimension 0 = -3"), Error);
  CHECK(layout.specs().empty());
  CHECK_THROWS_WITH_AS(layout.add("w", {Index{1} << 40, Index{1} << 40}),
                       doctest::Contains("more than 2^59 elements"), Error);
}
