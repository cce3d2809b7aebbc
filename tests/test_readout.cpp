// What a researcher reads from a cache after a forward and a backward
// (docs/layer.md, "Reading what a forward did"), each against values
// computed independently here: the logits from x W_r^T, p by a softmax, the
// gates by their definition, the selection as the top-k of the logits, the
// counts before and after capacity, the kept mask, the loss terms, ReMoE's
// sparsity, ACMoE's cluster statistics, DefaultEMA's batch means, and
// dL/dG and dL/dz after a backward.

#include <algorithm>
#include <cmath>
#include <numeric>

#include "support.hpp"

using namespace moe;
using namespace moe::test;

namespace {

constexpr Index kT = 24, kD = 6, kE = 5;

template <class Estimator = estimator::Sparse>
using TopKLayer = Layer<router::TopK, Estimator, cpu::Backend<double>, act::GELU>;

}  // namespace

TEST_CASE("logits, probabilities, gates and the selection of each TopK normalisation") {
  const auto x = random_matrix<double>(kT, kD, 1);
  for (int normalization = 0; normalization < 3; ++normalization) {
    CAPTURE(normalization);
    const router::TopK topk{.k = 2,
                            .renormalize = normalization == 1,
                            .softmax_over_selected = normalization == 2,
                            .bias = true,
                            .init_std = 0.5};
    TopKLayer<> layer({.d_model = kD, .d_ff = 4, .experts = kE}, topk, {}, 3);
    auto b = layer.parameters()["router.bias"];
    for (std::size_t e = 0; e < b.size(); ++e) b[e] = 0.1 * static_cast<double>(e);
    TopKLayer<>::Cache cache;
    Mat<double> y(kT, kD);
    layer.forward(x, y, cache, Mode::train);
    const auto w = layer.parameters().matrix("router.weight");
    const auto z = cache.logits();
    const auto p = cache.probabilities();
    const auto g = cache.gates();
    REQUIRE(z.rows() == kT);
    REQUIRE(z.cols() == kE);
    REQUIRE(p.rows() == kT);
    REQUIRE(g.rows() == kT);
    REQUIRE(cache.selection_offsets().size() == static_cast<std::size_t>(kT + 1));
    for (Index t = 0; t < kT; ++t) {
      CAPTURE(t);
      double zt[kE], max = -INFINITY, sum = 0;
      for (Index e = 0; e < kE; ++e) {
        zt[e] = b[static_cast<std::size_t>(e)];
        for (Index q = 0; q < kD; ++q) zt[e] += x(t, q) * w(e, q);
        CHECK(z(t, e) == doctest::Approx(zt[e]).epsilon(1e-13));
        max = std::max(max, zt[e]);
      }
      for (Index e = 0; e < kE; ++e) sum += std::exp(zt[e] - max);
      // The selection: the two largest logits, best first.
      std::vector<int> order(kE);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int a, int c) { return zt[a] > zt[c]; });
      const auto chosen = cache.selected_experts(t);
      REQUIRE(chosen.size() == 2);
      CHECK(chosen[0] == order[0]);
      CHECK(chosen[1] == order[1]);
      CHECK(cache.top1_assignment()[static_cast<std::size_t>(t)] == order[0]);
      const double selected_mass =
          (std::exp(zt[order[0]] - max) + std::exp(zt[order[1]] - max)) / sum;
      for (Index e = 0; e < kE; ++e) {
        const double pe = std::exp(zt[e] - max) / sum;
        CHECK(p(t, e) == doctest::Approx(pe).epsilon(1e-13));
        const bool on = e == order[0] || e == order[1];
        const double expected = normalization == 0   ? pe
                                : on                 ? pe / selected_mass
                                : normalization == 1 ? pe  // G~ = p off A
                                                     : 0.0;
        CHECK(g(t, e) == doctest::Approx(expected).epsilon(1e-13));
      }
    }
  }
}

TEST_CASE("counts before and after capacity, and the kept mask") {
  const auto x = random_matrix<double>(kT, kD, 2);
  TopKLayer<> layer({.d_model = kD, .d_ff = 4, .experts = kE, .capacity_factor = 0.6},
                    router::TopK{.k = 2, .init_std = 0.9}, {}, 4);
  TopKLayer<>::Cache cache;
  Mat<double> y(kT, kD);
  layer.forward(x, y, cache, Mode::train);
  const auto& s = cache.stats();
  const Index capacity = layer.capacity(kT);  // ceil(0.6 * 24 * 2 / 5) = 6
  REQUIRE(capacity == 6);
  REQUIRE(s.dropped_pairs > 0);
  std::vector<Index> routed(kE, 0), kept(kE, 0);
  const auto mask = cache.kept_mask();
  const auto experts = cache.selected_experts();
  REQUIRE(mask.size() == experts.size());
  for (std::size_t q = 0; q < experts.size(); ++q) {
    ++routed[static_cast<std::size_t>(experts[q])];
    // Token order inside an expert: a pair is kept while its expert has room.
    const bool room = kept[static_cast<std::size_t>(experts[q])] < capacity;
    CHECK(mask[q] == (room ? 1 : 0));
    if (room) ++kept[static_cast<std::size_t>(experts[q])];
  }
  CHECK(s.routed_per_expert == routed);
  CHECK(s.tokens_per_expert == kept);
  CHECK(std::accumulate(mask.begin(), mask.end(), Index{0}) == s.selected_pairs - s.dropped_pairs);
}

TEST_CASE("loss terms apart and together; none in eval") {
  const auto x = random_matrix<double>(kT, kD, 3);
  TopKLayer<> layer({.d_model = kD, .d_ff = 4, .experts = kE},
                    router::TopK{.k = 2, .aux_coef = 0.05, .z_coef = 0.01}, {}, 5);
  TopKLayer<>::Cache cache;
  Mat<double> y(kT, kD);
  layer.forward(x, y, cache, Mode::train);
  const auto& s = cache.stats();
  CHECK(s.load_balance_loss > 0);
  CHECK(s.l1_loss == 0);
  // z-loss = z_coef mean_t logsumexp(z_t)^2, from the logits read back.
  double z_loss = 0;
  const auto z = cache.logits();
  for (Index t = 0; t < kT; ++t) {
    double lse = 0, max = -INFINITY;
    for (Index e = 0; e < kE; ++e) max = std::max(max, z(t, e));
    for (Index e = 0; e < kE; ++e) lse += std::exp(z(t, e) - max);
    lse = max + std::log(lse);
    z_loss += lse * lse;
  }
  CHECK(s.z_loss == doctest::Approx(0.01 * z_loss / kT).epsilon(1e-12));
  CHECK(s.aux_loss == s.load_balance_loss + s.z_loss);
  layer.forward(x, y, cache, Mode::eval);
  CHECK(cache.stats().aux_loss == 0);
  CHECK(cache.stats().load_balance_loss == 0);
  CHECK(cache.stats().z_loss == 0);
}

TEST_CASE("ReLU routing: no probabilities, the L1 term, the sparsity") {
  using L = Layer<router::ReluL1, estimator::Sparse, cpu::Backend<double>, act::SwiGLU>;
  const auto controller =
      std::make_shared<router::LambdaController>(router::LambdaController::for_experts(2, 5, 0.1));
  L layer({.d_model = kD, .d_ff = 4, .experts = kE}, router::ReluL1{.controller = controller}, {},
          6);
  const auto x = random_matrix<double>(kT, kD, 4);
  L::Cache cache;
  Mat<double> y(kT, kD);
  layer.forward(x, y, cache, Mode::train);
  CHECK(cache.probabilities().rows() == 0);
  const auto z = cache.logits();
  const auto g = cache.gates();
  Index active = 0;
  std::vector<Index> n(kE, 0);
  double l1 = 0;
  for (Index t = 0; t < kT; ++t) {
    for (Index e = 0; e < kE; ++e) {
      CHECK(g(t, e) == std::max(z(t, e), 0.0));
      if (z(t, e) > 0) ++active, ++n[static_cast<std::size_t>(e)];
    }
    CHECK(static_cast<Index>(cache.selected_experts(t).size()) ==
          std::count_if(&z(t, 0), &z(t, 0) + kE, [](double v) { return v > 0; }));
  }
  for (Index e = 0; e < kE; ++e)
    for (Index t = 0; t < kT; ++t)
      l1 += static_cast<double>(n[static_cast<std::size_t>(e)]) * g(t, e);
  l1 *= 0.1 * kE / (2.0 * kT * kT);  // lambda E / (k T^2)
  const auto& s = cache.stats();
  CHECK(s.l1_loss == doctest::Approx(l1).epsilon(1e-12));
  CHECK(s.aux_loss == s.l1_loss);
  CHECK(s.load_balance_loss == 0);
  CHECK(s.zero_gate_fraction == doctest::Approx(1.0 - static_cast<double>(active) / (kT * kE)));
  layer.forward(x, y, cache, Mode::eval);
  CHECK(cache.stats().l1_loss == 0);
}

TEST_CASE("DefaultEMA: the batch means and which experts moved") {
  TopKLayer<estimator::DefaultEMA> layer({.d_model = kD, .d_ff = 4, .experts = kE},
                                         router::TopK{.k = 1}, {.beta = 0.25}, 7);
  const auto x = random_matrix<double>(kT, kD, 5);
  TopKLayer<estimator::DefaultEMA>::Cache cache;
  Mat<double> y(kT, kD);
  layer.forward(x, y, cache, Mode::train);  // the EMA starts at 0
  const auto& est = cache.estimator_cache();
  const auto ema = layer.state().matrix("estimator.ema");
  for (Index e = 0; e < kE; ++e) {
    CAPTURE(e);
    const bool routed = cache.stats().routed_per_expert[static_cast<std::size_t>(e)] > 0;
    CHECK(est.updated[static_cast<std::size_t>(e)] == (routed ? 1 : 0));
    for (Index j = 0; j < kD; ++j)
      if (routed) {
        // Ehat = 0.25 * 0 + 0.75 m_e
        CHECK(ema(e, j) ==
              doctest::Approx(0.75 * est.batch_mean[static_cast<std::size_t>(e * kD + j)]));
      } else {
        CHECK(ema(e, j) == 0);
      }
  }
  // k = 1, plain softmax: y_t = p_te E_e(x_t) + sum_{i != e} p_ti Ehat_i, so
  // the mean of E_e(x_t) over e's tokens is recovered from y, p and Ehat.
  const auto p = cache.probabilities();
  for (Index e = 0; e < kE; ++e) {
    if (est.updated[static_cast<std::size_t>(e)] == 0) continue;
    for (Index j = 0; j < kD; ++j) {
      double sum = 0;
      Index count = 0;
      for (Index t = 0; t < kT; ++t) {
        if (cache.selected_experts(t)[0] != e) continue;
        double rest = 0;
        for (Index i = 0; i < kE; ++i)
          if (i != e) rest += p(t, i) * ema(i, j);
        sum += (y(t, j) - rest) / p(t, e);
        ++count;
      }
      CHECK(est.batch_mean[static_cast<std::size_t>(e * kD + j)] ==
            doctest::Approx(sum / static_cast<double>(count)).epsilon(1e-9));
    }
  }
  // An eval forward computes the batch means too, and takes none of them.
  const std::vector<double> train_means(est.batch_mean.begin(), est.batch_mean.end());
  const std::vector<double> ema_after(layer.state()["estimator.ema"].begin(),
                                      layer.state()["estimator.ema"].end());
  layer.forward(x, y, cache, Mode::eval);
  for (int u : cache.estimator_cache().updated) CHECK(u == 0);
  CHECK(std::vector<double>(cache.estimator_cache().batch_mean.begin(),
                            cache.estimator_cache().batch_mean.end()) == train_means);
  CHECK(std::equal(ema_after.begin(), ema_after.end(), layer.state()["estimator.ema"].begin()));
}

TEST_CASE("ACMoE statistics: a forward without clusters leaves none from the one before") {
  using A = Layer<router::AdaptiveCluster, estimator::Sparse, cpu::Backend<double>, act::ReLU>;
  A layer({.d_model = kD, .d_ff = 4, .experts = kE}, router::AdaptiveCluster{}, {}, 10);
  const auto x = random_matrix<double>(kT, kD, 9);
  std::vector<int> clusters(kT);
  for (Index t = 0; t < kT; ++t) clusters[static_cast<std::size_t>(t)] = static_cast<int>(t % 3);
  A::Cache cache;
  Mat<double> y(kT, kD);
  layer.forward(x, y, cache, Mode::train, {.previous_assignment = clusters});
  CHECK(cache.router_cache().clusters == 3);
  CHECK(cache.router_cache().mean.size() == static_cast<std::size_t>(3 * kD));
  layer.forward(x, y, cache, Mode::train);  // the first MoE layer: M = 1
  CHECK(cache.router_cache().clusters == 0);
  CHECK(cache.router_cache().mean.size() == 0);
  CHECK(cache.router_cache().scales.size() == 0);
  const auto m = router::AdaptiveCluster::token_scales(cache.router_cache(), kT, kD);
  for (double v : m) CHECK(v == 1.0);
}

TEST_CASE("a cache no forward filled has nothing to read") {
  TopKLayer<>::Cache cache;
  CHECK_THROWS_WITH_AS(cache.logits(), doctest::Contains("filled()=false"), Error);
  CHECK_THROWS_AS(cache.selected_experts(), Error);
  CHECK_THROWS_AS(cache.kept_mask(), Error);
}

TEST_CASE("after a backward: dL/dG, and dL/dz through the softmax") {
  TopKLayer<> layer({.d_model = kD, .d_ff = 4, .experts = kE},
                    router::TopK{.k = 2, .aux_coef = 0, .init_std = 0.5}, {}, 8);
  const auto x = random_matrix<double>(kT, kD, 6), dy = random_matrix<double>(kT, kD, 7);
  TopKLayer<>::Cache cache;
  Mat<double> y(kT, kD), dx(kT, kD);
  layer.forward(x, y, cache, Mode::train);
  CHECK_THROWS_WITH_AS(cache.gate_gradients(), doctest::Contains("no backward"), Error);
  auto grads = layer.make_gradients();
  layer.backward(x, cache, dy, dx, grads);
  const auto dg = cache.gate_gradients();
  const auto dz = cache.logit_gradients();
  const auto p = cache.probabilities();
  for (Index t = 0; t < kT; ++t) {
    const auto chosen = cache.selected_experts(t);
    double dot = 0;
    for (Index e = 0; e < kE; ++e) {
      const bool on = std::find(chosen.begin(), chosen.end(), e) != chosen.end();
      if (!on) CHECK(dg(t, e) == 0);  // Sparse: no gradient off the selection
      dot += p(t, e) * dg(t, e);
    }
    // Plain softmax gates, no training loss: dz_e = p_e (dG_e - sum_i p_i dG_i).
    for (Index e = 0; e < kE; ++e)
      CHECK(dz(t, e) == doctest::Approx(p(t, e) * (dg(t, e) - dot)).epsilon(1e-12));
  }
  // dW_r = dz^T x: the router's gradient from the gradient read back.
  const auto dw = grads.matrix("router.weight");
  for (Index e = 0; e < kE; ++e)
    for (Index q = 0; q < kD; ++q) {
      double expected = 0;
      for (Index t = 0; t < kT; ++t) expected += dz(t, e) * x(t, q);
      CHECK(dw(e, q) == doctest::Approx(expected).epsilon(1e-12));
    }
  layer.forward(x, y, cache, Mode::train);  // a new forward: its gradients are not there yet
  CHECK_THROWS_AS(cache.logit_gradients(), Error);
  CHECK_THROWS_WITH_AS(cache.selected_experts(kT), doctest::Contains("t=24"), Error);
}

TEST_CASE("a k schedule resumes at step t with one call") {
  using L = Layer<router::RandomFrozen<>, estimator::Sparse, cpu::Backend<double>, act::ReLU>;
  L layer({.d_model = kD, .d_ff = 4, .experts = 8, .expert_bias = true},
          router::random_frozen(router::schedule::Linear{.k_min = 2, .k_max = 8, .total_steps = 6}),
          {}, 9);
  layer.set_schedule_step(4);
  CHECK(layer.router().k() == 6);
  CHECK(layer.state()["router.step"][0] == 4);
  const auto x = random_matrix<double>(kT, kD, 8);
  L::Cache cache;
  Mat<double> y(kT, kD);
  layer.forward(x, y, cache, Mode::train);
  CHECK(cache.stats().selected_pairs == kT * 6);
}
