// Bad input gets moe::Error naming the argument, its value and what was
// expected, before any work is done.

#include "support.hpp"

using namespace moe;
using namespace moe::test;

namespace {

using L = Layer<router::TopK, estimator::Sparse, cpu::Backend<double>, act::GELU>;
const LayerConfig kConfig{.d_model = 4, .d_ff = 6, .experts = 3};

// The thrown message contains every fragment.
template <class F>
void check_error(F&& f, std::initializer_list<const char*> fragments) {
  try {
    f();
    FAIL("expected moe::Error");
  } catch (const Error& e) {
    const std::string what = e.what();
    CAPTURE(what);
    for (const char* fragment : fragments) CHECK(what.find(fragment) != std::string::npos);
  }
}

}  // namespace

TEST_CASE("moe::Error is a std::invalid_argument") {
  CHECK_THROWS_AS(L({.d_model = 0, .d_ff = 6, .experts = 3}), std::invalid_argument);
}

TEST_CASE("bad configuration") {
  check_error([] { L({.d_model = 0, .d_ff = 6, .experts = 3}); }, {"d_model=0", "expected >= 1"});
  check_error([] { L({.d_model = 4, .d_ff = 0, .experts = 3}); }, {"d_ff=0"});
  check_error([] { L({.d_model = 4, .d_ff = 6, .experts = 0}); }, {"experts=0"});
  check_error([] { L(kConfig, router::TopK{.k = 0}); }, {"k=0", "expected 1 <= k <= experts=3"});
  check_error([] { L(kConfig, router::TopK{.k = 4}); }, {"k=4", "experts=3"});
  check_error([] { L(kConfig, router::TopK{.k = 1, .aux_coef = -1}); }, {"aux_coef=-1"});
  check_error([] { L(kConfig, router::TopK{.k = 1, .z_coef = std::nan("")}); }, {"z_coef=nan"});
  check_error(
      [] { L(kConfig, router::TopK{.k = 1, .renormalize = true, .softmax_over_selected = true}); },
      {"renormalize=true", "softmax_over_selected=true"});
  check_error([] { L({.d_model = 4, .d_ff = 6, .experts = 3, .dropout = 1.0}); },
              {"dropout=1", "expected 0 <= dropout < 1"});
  check_error([] { L({.d_model = 4, .d_ff = 6, .experts = 3, .capacity_factor = -0.5}); },
              {"capacity_factor=-0.5"});
  using Gated = Layer<router::TopK, estimator::Sparse, cpu::Backend<double>, act::SwiGLU>;
  check_error([] { Gated({.d_model = 4, .d_ff = 6, .experts = 3, .expert_bias = true}); },
              {"expert_bias=true", "swiglu"});
  check_error([] { cpu::Backend<float>(-2); }, {"threads=-2"});
}

TEST_CASE("bad forward arguments") {
  L layer(kConfig, router::TopK{.k = 2});
  L::Cache cache;
  Mat<double> y(5, 4);
  check_error([&] { layer.forward(Mat<double>(Mat<double>::Zero(5, 5)), y, cache, Mode::train); },
              {"x.cols()=5", "expected d_model=4"});
  check_error([&] { layer.forward(Mat<double>(Mat<double>::Zero(0, 4)), y, cache, Mode::train); },
              {"x.rows()=0", "at least 1 token"});
  Mat<double> y_bad(4, 4);
  check_error(
      [&] { layer.forward(Mat<double>(Mat<double>::Zero(5, 4)), y_bad, cache, Mode::train); },
      {"y is (4, 4)", "expected (5, 4)"});
  Mat<double> x = Mat<double>::Zero(5, 4);
  check_error([&] { layer.forward(x, x, cache, Mode::train); }, {"y aliases x"});
  // k changed at run time to an invalid value is caught at the next forward.
  layer.router().k = 7;
  check_error([&] { layer.forward(x, y, cache, Mode::train); }, {"k=7"});
}

TEST_CASE("non-finite input is rejected when checking is on, and only then") {
  LayerConfig checked = kConfig;
  checked.check_finite = true;
  L layer(checked, router::TopK{.k = 2});
  L::Cache cache;
  Mat<double> x = random_matrix<double>(5, 4, 1), y(5, 4), dx(5, 4);
  x(3, 2) = std::numeric_limits<double>::quiet_NaN();
  check_error([&] { layer.forward(x, y, cache, Mode::train); }, {"x(3, 2)=nan is not finite"});
  x(3, 2) = std::numeric_limits<double>::infinity();
  check_error([&] { layer.forward(x, y, cache, Mode::train); }, {"x(3, 2)=inf is not finite"});
  x(3, 2) = 0;
  layer.forward(x, y, cache, Mode::train);
  Mat<double> dy = random_matrix<double>(5, 4, 2);
  dy(0, 1) = std::numeric_limits<double>::quiet_NaN();
  auto grads = layer.make_gradients();
  check_error([&] { layer.backward(x, cache, dy, dx, grads); }, {"dy(0, 1)=nan is not finite"});

  L unchecked(kConfig, router::TopK{.k = 2});
  x(3, 2) = std::numeric_limits<double>::quiet_NaN();
  CHECK_NOTHROW(unchecked.forward(x, y, cache, Mode::train));
}

TEST_CASE("bad backward arguments") {
  L layer(kConfig, router::TopK{.k = 2});
  L::Cache cache;
  auto grads = layer.make_gradients();
  const Mat<double> x = random_matrix<double>(5, 4, 1);
  Mat<double> y(5, 4), dx(5, 4), dy = random_matrix<double>(5, 4, 2);
  check_error([&] { layer.backward(x, cache, dy, dx, grads); }, {"cache.filled()=false"});
  layer.forward(x, y, cache, Mode::train);
  check_error(
      [&] {
        layer.backward(random_matrix<double>(6, 4, 1), cache, Mat<double>(Mat<double>::Zero(6, 4)),
                       dx, grads);
      },
      {"x.rows()=6", "expected cache.tokens()=5"});
  Mat<double> dy_bad(5, 3);
  check_error([&] { layer.backward(x, cache, dy_bad, dx, grads); },
              {"dy is (5, 3)", "expected (5, 4)"});
  Mat<double> dx_bad(2, 4);
  check_error([&] { layer.backward(x, cache, dy, dx_bad, grads); }, {"dx is (2, 4)"});
  L other({.d_model = 4, .d_ff = 7, .experts = 3}, router::TopK{.k = 2});
  auto other_grads = other.make_gradients();
  check_error([&] { layer.backward(x, cache, dy, dx, other_grads); },
              {"grads has size", "make_gradients()"});
  // A cache filled by a layer of another shape.
  L::Cache foreign;
  Mat<double> y2(5, 4);
  other.forward(x, y2, foreign, Mode::train);
  check_error([&] { layer.backward(x, foreign, dy, dx, grads); },
              {"cache from a layer with (d_model, d_ff, experts)=(4, 7, 3)", "expected (4, 6, 3)"});
}

TEST_CASE("a cache is tied to the layer that filled it, and dx may not alias x") {
  L layer(kConfig, router::TopK{.k = 2});
  L twin(kConfig, router::TopK{.k = 2});  // same shape, another layer
  const Mat<double> x = random_matrix<double>(5, 4, 1);
  Mat<double> y(5, 4), dx(5, 4), dy = random_matrix<double>(5, 4, 2);
  L::Cache cache;
  twin.forward(x, y, cache, Mode::train);
  auto grads = layer.make_gradients();
  check_error([&] { layer.backward(x, cache, dy, dx, grads); },
              {"cache filled by layer #", "expected this layer #"});
  layer.forward(x, y, cache, Mode::train);
  Mat<double> x_copy = x;
  L::Cache own;
  layer.forward(x_copy, y, own, Mode::train);
  check_error([&] { layer.backward(x_copy, own, dy, x_copy, grads); }, {"dx aliases x"});
}

TEST_CASE("a strided Eigen block is refused, not misread") {
  L layer(kConfig, router::TopK{.k = 2});
  L::Cache cache;
  Mat<double> wide = random_matrix<double>(5, 6, 1), y(5, 4);
  check_error([&] { layer.forward(wide.leftCols(4), y, cache, Mode::train); },
              {"outerStride()=6", "expected contiguous rows (4, 1)"});
  const Mat<double> copy = wide.leftCols(4);  // the documented way out
  CHECK_NOTHROW(layer.forward(copy, y, cache, Mode::train));
}

TEST_CASE("tensor buffers name what is missing") {
  L layer(kConfig, router::TopK{.k = 2});
  check_error([&] { (void)layer.parameters()["router.bias"]; },
              {"no tensor named 'router.bias'", "router.weight"});
  TensorLayout layout;
  layout.add("a", {2, 3});
  check_error([&] { layout.add("a", {1}); }, {"duplicate tensor name 'a'"});
}

TEST_CASE("load_state checks a state before changing anything") {
  L layer(kConfig, router::TopK{.k = 2}, {}, 3);
  const std::vector<double> before(layer.state().flat().begin(), layer.state().flat().end());
  auto unchanged = [&] {
    CHECK(std::equal(before.begin(), before.end(), layer.state().flat().begin()));
  };
  // Each value would be cast back to an integer: anything but a whole number
  // in range is undefined behaviour there.
  const std::pair<const char*, double> bad[] = {{"layer.train_forwards", -1},
                                                {"layer.train_forwards", 0.5},
                                                {"layer.train_forwards", std::nan("")},
                                                {"layer.train_forwards", 0x1p53},
                                                {"layer.dropout_seed", -1},
                                                {"layer.dropout_seed", 0x1p32}};
  for (const auto& entry : bad) {
    auto state = layer.state();
    state[entry.first][0] = entry.second;
    CAPTURE(entry.first);
    CAPTURE(entry.second);
    check_error([&] { layer.load_state(state); },
                {entry.first, "expected a whole number in [0, 2^"});
    unchanged();
  }
  auto good = layer.state();
  good["layer.dropout_seed"][1] = 0x1p32 - 1;
  CHECK_NOTHROW(layer.load_state(good));

  // A router state the router refuses: neither the layer nor the shared
  // controller changes.
  using R = Layer<router::ReluL1, estimator::DefaultEMA, cpu::Backend<double>, act::ReLU>;
  auto controller = std::make_shared<router::LambdaController>(
      router::LambdaController::Options{.target_sparsity = 0.5, .initial_lambda = 0.25});
  R relu({.d_model = 4, .d_ff = 6, .experts = 4}, router::ReluL1{.controller = controller}, {}, 1);
  auto state = relu.state();
  state["router.lambda"][0] = 0;
  state["estimator.ema"][0] = 42;
  check_error([&] { relu.load_state(state); }, {"lambda=0", "expected a finite value > 0"});
  CHECK(relu.state()["estimator.ema"][0] == 0);
  CHECK(controller->lambda() == 0.25);
}
