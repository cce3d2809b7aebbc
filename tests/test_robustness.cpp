// Bad input never crashes, hangs or silently corrupts state: sizes past what
// can be indexed or allocated, a NaN batch and NaN checkpoints against
// Default MoE's state, optimiser options and buffers, overlapping buffers,
// a vanishing capacity factor, a refused ACMoE forward, and weights changed
// between a forward and its backward. Each case failed before its fix.

#include <sys/resource.h>
#include <unistd.h>

#include <cmath>
#include <fstream>
#include <limits>
#include <new>

#include "support.hpp"

using namespace moe;
using namespace moe::test;

namespace {

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "no moe::Error";
}

template <class Act = act::GELU, class Estimator = estimator::Sparse>
using L = Layer<router::TopK, Estimator, cpu::Backend<double>, Act>;

}  // namespace

TEST_CASE("sizes past 2^59 values or past the memory are moe::Error, not a crash") {
  // 2 x 2^62 overflowed the element count: the buffer held 2 values and the
  // initialiser wrote past it.
  const std::string huge = error_of(
      [] { L<>({.d_model = 2, .d_ff = Index{1} << 62, .experts = 1}, router::TopK{.k = 1}); });
  CAPTURE(huge);
  CHECK(huge.find("'experts.w1' of shape (1, 2, 4611686018427387904)") != std::string::npos);
  CHECK(huge.find("2^59") != std::string::npos);
  // SwiGLU's first weight is (d, 2 d_ff): 2 x 2^62 overflowed before the
  // tensor's check.
  const std::string gated = error_of([] {
    L<act::SwiGLU>({.d_model = 2, .d_ff = Index{1} << 62, .experts = 1}, router::TopK{.k = 1});
  });
  CAPTURE(gated);
  CHECK(gated.find("d_ff=4611686018427387904 with swiglu") != std::string::npos);
  TensorLayout layout;
  CHECK(error_of([&] {
          layout.add("t", {-1, 2});
        }).find("'t' of shape (-1, 2)") != std::string::npos);
  // 2^51 values fit the index but no memory: std::bad_alloc became moe::Error.
  // AddressSanitizer's operator new aborts on such a request instead of
  // throwing (allocator_may_return_null covers only malloc), so this part
  // runs in the builds without it.
  if (kAddressSanitizer) return;
  const std::string big = error_of(
      [] { L<>({.d_model = 2, .d_ff = Index{1} << 50, .experts = 1}, router::TopK{.k = 1}); });
  CAPTURE(big);
  CHECK(big.find("cannot allocate") != std::string::npos);
  CHECK(big.find("experts.w1") != std::string::npos);
}

TEST_CASE("a batch whose buffers would pass 2^59 values is refused before any work") {
  L<> layer({.d_model = 1, .d_ff = 1, .experts = 1 << 20}, router::TopK{.k = 1}, {}, 1);
  // x itself is small here: a view that claims 2^40 rows of one value.
  const double one = 1;
  ConstMatrixView<double> x(&one, Index{1} << 40, 1);
  std::vector<double> out(1);
  MatrixView<double> y(out.data(), Index{1} << 40, 1);
  L<>::Cache cache;
  CHECK(error_of([&] { layer.forward(x, y, cache, Mode::eval); }).find("past 2^59 values") !=
        std::string::npos);
}

TEST_CASE("a batch the memory refuses is moe::Error, not std::bad_alloc") {
  if (kAddressSanitizer) return;  // its operator new aborts instead of throwing
  // 2^22 tokens over 1024 experts: the (T, E) logits alone are 32 GiB, within
  // 2^59 values, past an address space of what the process holds + 1 GiB.
  L<> layer({.d_model = 1, .d_ff = 1, .experts = 1024}, router::TopK{.k = 1}, {}, 1);
  const Index T = Index{1} << 22;
  std::vector<double> x(static_cast<std::size_t>(T), 0.5), y(x.size());
  L<>::Cache cache;
  std::string what;
  {
    test::AddressSpaceLimit limit(std::uint64_t{1} << 30);
    if (!limit.active()) return;  // a tighter limit is already set
    try {
      layer.forward(ConstMatrixView<double>(x.data(), T, 1), MatrixView<double>(y.data(), T, 1),
                    cache, Mode::eval);
    } catch (const Error& e) {
      what = e.what();
    } catch (const std::bad_alloc&) {
      what = "std::bad_alloc";
    }
  }
  CAPTURE(what);
  CHECK(what.find("moe::Layer::forward: out of memory for x.rows()=4194304 tokens") !=
        std::string::npos);
  CHECK_FALSE(cache.filled());
}

TEST_CASE("one NaN batch does not poison Default MoE's EMA") {
  using D = L<act::GELU, estimator::DefaultEMA>;
  D layer({.d_model = 4, .d_ff = 5, .experts = 3}, router::TopK{.k = 1}, {.beta = 0.5}, 2);
  const auto x = random_matrix<double>(12, 4, 1);
  Mat<double> y(12, 4);
  D::Cache cache;
  layer.forward(x, y, cache, Mode::train);  // a clean batch moves the EMA
  const auto ema_before = std::vector<double>(layer.state()["estimator.ema"].begin(),
                                              layer.state()["estimator.ema"].end());
  Mat<double> bad = x;
  bad(3, 2) = std::nan("");  // check_finite is off (the default)
  layer.forward(bad, y, cache, Mode::train);
  const auto& est = cache.estimator_cache();
  const int nan_expert = cache.selected_experts(3)[0];
  CHECK(est.non_finite[static_cast<std::size_t>(nan_expert)] == 1);
  CHECK(est.updated[static_cast<std::size_t>(nan_expert)] == 0);
  for (Index j = 0; j < 4; ++j)  // that expert's Ehat kept its value
    CHECK(layer.state().matrix("estimator.ema")(nan_expert, j) ==
          ema_before[static_cast<std::size_t>(nan_expert * 4 + j)]);
  for (double v : layer.state()["estimator.ema"]) CHECK(std::isfinite(v));
  // An eval forward flags it too (it read 0 in eval), and moves nothing.
  layer.forward(bad, y, cache, Mode::eval);
  CHECK(cache.estimator_cache().non_finite[static_cast<std::size_t>(nan_expert)] == 1);
  for (int u : cache.estimator_cache().updated) CHECK(u == 0);
  layer.forward(x, y, cache, Mode::train);  // and later clean batches are clean
  CHECK(y.allFinite());
}

TEST_CASE("load_state refuses NaN and Inf values, and changes nothing") {
  using D = L<act::GELU, estimator::DefaultEMA>;
  D layer({.d_model = 4, .d_ff = 5, .experts = 3}, router::TopK{.k = 1}, {}, 2);
  for (const double bad : {std::nan(""), std::numeric_limits<double>::infinity()}) {
    auto state = layer.state();
    state["estimator.ema"][5] = bad;
    const std::string what = error_of([&] { layer.load_state(state); });
    CAPTURE(what);
    CHECK(what.find("estimator.ema[5]") != std::string::npos);
    CHECK(what.find("expected finite values") != std::string::npos);
    for (double v : layer.state()["estimator.ema"]) CHECK(v == 0);
  }
}

TEST_CASE("a float layer refuses a state value past float's range") {
  // 1e300 is finite in the state's doubles, but the EMA term of a float
  // layer's outputs became Inf.
  using F = Layer<router::TopK, estimator::DefaultEMA, cpu::Backend<float>, act::GELU>;
  F layer({.d_model = 4, .d_ff = 5, .experts = 3}, router::TopK{.k = 1}, {}, 2);
  auto state = layer.state();
  state["estimator.ema"][5] = 1e300;
  const std::string what = error_of([&] { layer.load_state(state); });
  CAPTURE(what);
  CHECK(what.find("estimator.ema[5]=1e+300") != std::string::npos);
  CHECK(what.find("expected a magnitude of at most 3.40282e+38") != std::string::npos);
  for (double v : layer.state()["estimator.ema"]) CHECK(v == 0);
  state["estimator.ema"][5] = 1e30;  // within range: taken
  CHECK_NOTHROW(layer.load_state(state));
}

TEST_CASE("optimiser options are checked at every step, and moments belong to one buffer") {
  L<> layer({.d_model = 4, .d_ff = 5, .experts = 3}, router::TopK{.k = 1}, {}, 2);
  auto grads = layer.make_gradients();
  for (auto& g : grads.flat()) g = 0.1;
  CHECK(error_of([] { optim::AdamW({.weight_decay = std::nan("")}); }).find("weight_decay=nan") !=
        std::string::npos);
  CHECK(error_of([] { optim::AdamW({.weight_decay = -0.1}); }).find("weight_decay=-0.1") !=
        std::string::npos);
  const std::vector<double> before(layer.parameters().flat().begin(),
                                   layer.parameters().flat().end());
  const auto unchanged = [&] {
    CHECK(std::equal(before.begin(), before.end(), layer.parameters().flat().begin()));
  };
  optim::AdamW adam;
  adam.options().lr = std::nan("");
  CHECK(error_of([&] { adam.step(layer.parameters(), grads); }).find("lr=nan") !=
        std::string::npos);
  unchanged();
  optim::Sgd sgd;
  sgd.options().momentum = 5;
  CHECK(error_of([&] { sgd.step(layer.parameters(), grads); }).find("momentum=5") !=
        std::string::npos);
  unchanged();
  const std::vector<double> m{std::nan("")}, v{0.0};
  CHECK(error_of([&] { adam.restore(1, m, v); }).find("m[0]=nan") != std::string::npos);
  // One AdamW on two buffers of the same size mixed their moments.
  optim::AdamW one;
  L<> twin({.d_model = 4, .d_ff = 5, .experts = 3}, router::TopK{.k = 1}, {}, 3);
  one.step(layer.parameters(), grads);
  CHECK(error_of([&] { one.step(twin.parameters(), grads); }).find("one AdamW per parameter") !=
        std::string::npos);
  optim::Sgd two;
  two.step(layer.parameters(), grads);
  CHECK(error_of([&] { two.step(twin.parameters(), grads); }).find("one Sgd per parameter") !=
        std::string::npos);
}

TEST_CASE("overlapping buffers are refused by address range, not only by equal pointers") {
  L<> layer({.d_model = 4, .d_ff = 5, .experts = 3}, router::TopK{.k = 2}, {}, 2);
  const auto x = random_matrix<double>(6, 4, 1), dy = random_matrix<double>(6, 4, 2);
  Mat<double> y(6, 4), dx(6, 4);
  L<>::Cache cache;
  // y one row into x's memory.
  Mat<double> both = random_matrix<double>(7, 4, 3);
  MatrixView<const double> x_part(both.data(), 6, 4);
  MatrixView<double> y_part(both.data() + 4, 6, 4);
  CHECK(error_of([&] {
          layer.forward(x_part, y_part, cache, Mode::train);
        }).find("y aliases x (their memory overlaps)") != std::string::npos);
  auto& weights = layer.parameters();  // taken before the forward
  layer.forward(x, y, cache, Mode::train);
  auto grads = layer.make_gradients();
  // The gradients added into the weights themselves.
  CHECK(error_of([&] {
          layer.backward(x, cache, dy, dx, weights);
        }).find("grads overlaps the layer's parameters") != std::string::npos);
  Mat<double> shared = x;
  shared.conservativeResize(7, 4);
  L<>::Cache own;
  layer.forward(MatrixView<const double>(shared.data(), 6, 4), y, own, Mode::train);
  CHECK(error_of([&] {
          layer.backward(MatrixView<const double>(shared.data(), 6, 4), own, dy,
                         MatrixView<double>(shared.data() + 4, 6, 4), grads);
        }).find("dx aliases x (their memory overlaps)") != std::string::npos);
}

TEST_CASE("outputs overlapping the parameters, the gradients or the state are refused") {
  using D = L<act::GELU, estimator::DefaultEMA>;  // a state with an EMA: E x d doubles
  D layer({.d_model = 4, .d_ff = 5, .experts = 3}, router::TopK{.k = 2}, {}, 2);
  const auto x = random_matrix<double>(2, 4, 1), dy = random_matrix<double>(2, 4, 2);
  Mat<double> y(2, 4), dx(2, 4);
  D::Cache cache;
  auto grads = layer.make_gradients();
  double* params = layer.parameters().flat().data();
  double* state = layer.state().flat().data();
  REQUIRE(layer.state().size() >= 10);
  auto view = [](double* p) { return MatrixView<double>(p, 2, 4); };
  const auto unchanged = [&] {
    return std::vector<double>(layer.state().flat().begin(), layer.state().flat().end());
  };
  const auto state_before = unchanged();
  CHECK(error_of([&] {
          layer.forward(x, view(params + 1), cache, Mode::train);
        }).find("y overlaps the layer's parameters") != std::string::npos);
  CHECK(error_of([&] {
          layer.forward(x, view(state + 1), cache, Mode::train);
        }).find("y overlaps the layer's state") != std::string::npos);
  CHECK(unchanged() == state_before);
  layer.forward(x, y, cache, Mode::train);
  CHECK(error_of([&] {
          layer.backward(x, cache, dy,
                         view(const_cast<double*>(std::as_const(layer).parameters().flat().data())),
                         grads);
        }).find("dx overlaps the parameters or grads") != std::string::npos);
  CHECK(error_of([&] {
          layer.backward(x, cache, dy, view(grads.flat().data() + 3), grads);
        }).find("dx overlaps the parameters or grads") != std::string::npos);
  CHECK(error_of([&] {
          layer.backward(MatrixView<const double>(grads.flat().data() + 2, 2, 4), cache, dy, dx,
                         grads);
        }).find("x overlaps grads") != std::string::npos);
  CHECK(error_of([&] {
          layer.backward(x, cache, dy, view(state + 2), grads);
        }).find("dx or grads overlaps the layer's state") != std::string::npos);
  CHECK(std::all_of(grads.flat().begin(), grads.flat().end(), [](double g) { return g == 0; }));
  CHECK_NOTHROW(layer.backward(x, cache, dy, dx, grads));
}

TEST_CASE("a capacity factor above 0 keeps at least one pair per expert") {
  L<> layer({.d_model = 4, .d_ff = 5, .experts = 8, .capacity_factor = 5e-324},
            router::TopK{.k = 1}, {}, 2);
  CHECK(layer.capacity(1) == 1);
  const auto x = random_matrix<double>(6, 4, 1);
  Mat<double> y(6, 4);
  L<>::Cache cache;
  layer.forward(x, y, cache, Mode::train);
  CHECK(cache.stats().dropped_pairs < cache.stats().selected_pairs);
}

TEST_CASE("an ACMoE forward refused for its previous assignment leaves the cache as it was") {
  using A = Layer<router::AdaptiveCluster, estimator::Sparse, cpu::Backend<double>, act::ReLU>;
  A layer({.d_model = 4, .d_ff = 5, .experts = 4}, router::AdaptiveCluster{}, {}, 2);
  const auto x = random_matrix<double>(6, 4, 1), dy = random_matrix<double>(6, 4, 2);
  Mat<double> y(6, 4), dx(6, 4), dx_again(6, 4);
  A::Cache cache;
  const std::vector<int> clusters{0, 1, 0, 1, 2, -1};
  layer.forward(x, y, cache, Mode::train, {.previous_assignment = clusters});
  const std::vector<int> bad{0, 1, 0, 9, 2, -1};
  CHECK(error_of([&] {
          layer.forward(x, y, cache, Mode::train, {.previous_assignment = bad});
        }).find("previous_assignment[3]=9") != std::string::npos);
  CHECK(cache.filled());  // still the first forward's: its backward runs
  auto grads = layer.make_gradients();
  layer.backward(x, cache, dy, dx, grads);
  CHECK(dx.allFinite());
}

TEST_CASE("weights taken for writing between a forward and its backward are refused") {
  L<> layer({.d_model = 4, .d_ff = 5, .experts = 3}, router::TopK{.k = 2}, {}, 2);
  const auto x = random_matrix<double>(6, 4, 1), dy = random_matrix<double>(6, 4, 2);
  Mat<double> y(6, 4), dx(6, 4);
  L<>::Cache cache;
  auto grads = layer.make_gradients();
  layer.forward(x, y, cache, Mode::train);
  (void)std::as_const(layer).parameters()["experts.w1"];  // reading is fine
  CHECK_NOTHROW(layer.backward(x, cache, dy, dx, grads));
  layer.forward(x, y, cache, Mode::train);
  layer.parameters()["experts.w1"][0] += 1;  // two models mixed, before
  CHECK(error_of([&] {
          layer.backward(x, cache, dy, dx, grads);
        }).find("the parameters were taken for writing") != std::string::npos);
}

TEST_CASE("a layer assigned to between a forward and its backward refuses the cache") {
  // Two layers of the same shape and seed had the same version count, so an
  // assignment carried a version the cache matched: other weights, accepted.
  const LayerConfig config{.d_model = 4, .d_ff = 5, .experts = 3};
  L<> layer(config, router::TopK{.k = 2}, {}, 2), other(config, router::TopK{.k = 2}, {}, 3);
  const auto x = random_matrix<double>(6, 4, 1), dy = random_matrix<double>(6, 4, 2);
  Mat<double> y(6, 4), dx(6, 4);
  L<>::Cache cache;
  auto grads = layer.make_gradients();
  layer.forward(x, y, cache, Mode::train);
  layer = other;
  CHECK(error_of([&] {
          layer.backward(x, cache, dy, dx, grads);
        }).find("the parameters were taken for writing") != std::string::npos);
  // Moved-from and moved-to layers, likewise.
  L<> source(config, router::TopK{.k = 2}, {}, 4);
  source.forward(x, y, cache, Mode::train);
  L<> moved(std::move(source));
  CHECK(error_of([&] { moved.backward(x, cache, dy, dx, grads); }).find("expected this layer") !=
        std::string::npos);
}
