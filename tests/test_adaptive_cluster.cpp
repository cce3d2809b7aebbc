// ACMoE's adaptive-clustering router (docs/algorithms.md 3.3).

#include "support.hpp"

using namespace moe;
using namespace moe::test;

namespace {

using B = cpu::Backend<double>;
using Router = router::AdaptiveCluster;

struct RouterRun {
  Selection<double, B::Buffer> sel;
  Router::Cache<B> cache;
};

RouterRun run_router(const Router& r, const TensorBuffer<double>& params, const Mat<double>& x,
                     Index E, std::span<const int> previous) {
  RouterRun run;
  run.sel.tokens = x.rows();
  run.sel.experts = E;
  r.forward(B(1), Mode::train, ConstMatrixView<double>(x), params,
            ForwardContext{.previous_assignment = previous}, run.sel, run.cache);
  return run;
}

TensorBuffer<double> router_params(const Router& r, Index E, Index d, std::uint64_t seed) {
  auto layout = std::make_shared<TensorLayout>();
  const LayerConfig cfg{.d_model = d, .d_ff = 1, .experts = E};
  r.add_parameters(*layout, cfg);
  TensorBuffer<double> p(layout);
  r.init(p, cfg, seed);
  return p;
}

double scale(const RouterRun& run, Index k, Index q, Index d) {
  return run.cache.scales[static_cast<std::size_t>(k * d + q)];
}

}  // namespace

TEST_CASE("cluster weights M on 6 tokens: two clusters and an empty one") {
  // c = [0, 0, 0, 2, 2, 2]: clusters 0..2, cluster 1 empty (s = 0, w = 1e4).
  //   cluster 0: feature 0 = [1, 2, 3]: mu 2, MAD 2/3;  feature 1 = [0, 0, 0]: MAD 0
  //   cluster 2: feature 0 = [0, 0, 4]: mu 4/3, MAD 16/9; feature 1 = [1, -1, 1]: mu 1/3, MAD 8/9
  // w = 1 / (MAD + 1e-4); mean(w) ~ 5000.5, cap ~ 50005: nothing is clamped.
  // m_kq = w_kq / mean_k' w_k'q (the empty cluster's 1e4 enters the mean).
  Mat<double> x(6, 2);
  x << 1, 0, 2, 0, 3, 0, 0, 1, 0, -1, 4, 1;
  const std::vector<int> c{0, 0, 0, 2, 2, 2};
  const Router r;
  const auto params = router_params(r, 4, 2, 1);
  const auto run = run_router(r, params, x, 4, c);
  REQUIRE(run.cache.clusters == 3);
  // The statistics a researcher reads: mu, MAD and counts per cluster.
  const double mu[3][2] = {{2, 0}, {0, 0}, {4. / 3, 1. / 3}};
  const double mad[3][2] = {{2. / 3, 0}, {0, 0}, {16. / 9, 8. / 9}};
  CHECK(std::vector<Index>(run.cache.count.begin(), run.cache.count.end()) ==
        std::vector<Index>{3, 0, 3});
  for (int k = 0; k < 3; ++k)
    for (int q = 0; q < 2; ++q) {
      CHECK(run.cache.mean[static_cast<std::size_t>(k * 2 + q)] ==
            doctest::Approx(mu[k][q]).epsilon(1e-14));
      CHECK(run.cache.mad[static_cast<std::size_t>(k * 2 + q)] ==
            doctest::Approx(mad[k][q]).epsilon(1e-14));
    }
  const double eps = 1e-4;
  const double w[3][2] = {
      {1 / (2. / 3 + eps), 1 / eps}, {1 / eps, 1 / eps}, {1 / (16. / 9 + eps), 1 / (8. / 9 + eps)}};
  for (int q = 0; q < 2; ++q) {
    const double column = (w[0][q] + w[1][q] + w[2][q]) / 3;
    for (int k = 0; k < 3; ++k) {
      CAPTURE(k);
      CAPTURE(q);
      CHECK(scale(run, k, q, 2) == doctest::Approx(w[k][q] / column).epsilon(1e-12));
      CHECK(run.cache.weights[static_cast<std::size_t>(k * 2 + q)] ==
            doctest::Approx(w[k][q]).epsilon(1e-12));
      CHECK(run.cache.clamped[static_cast<std::size_t>(k * 2 + q)] ==
            run.cache.weights[static_cast<std::size_t>(k * 2 + q)]);  // nothing clamped
    }
  }
  // Token t's M is its cluster's row of m.
  const auto m = Router::token_scales(run.cache, 6, 2);
  for (int t = 0; t < 6; ++t)
    for (int q = 0; q < 2; ++q)
      CHECK(m[static_cast<std::size_t>(t * 2 + q)] ==
            scale(run, c[static_cast<std::size_t>(t)], q, 2));
}

TEST_CASE("cluster weights M: the clamp at 10 x mean(w)") {
  // 2 clusters x 6 features = 12 weights. Cluster 0's feature 0 is constant
  // (w = 1e4); every other feature is [a - 1.5, a, a + 1.5] in its cluster
  // (MAD 1, w = 1 / 1.0001). mean(w) = (1e4 + 11 / 1.0001) / 12 ~ 834.3, so
  // the cap 10 mean(w) ~ 8343 binds on w_00 alone. (An empty cluster adds d
  // weights of 1e4, which keeps the cap above 1e4 unless K > 10: the clamp and
  // an empty cluster cannot both act on 6 tokens, hence two cases.)
  Mat<double> x(6, 6);
  const double base[6] = {0.5, -1, 2, 0, 1, 3};
  for (int t = 0; t < 6; ++t)
    for (int q = 0; q < 6; ++q) x(t, q) = base[q] + (t % 3 - 1) * 1.5;
  for (int t = 0; t < 3; ++t) x(t, 0) = 7;  // constant in cluster 0
  const std::vector<int> c{0, 0, 0, 1, 1, 1};
  const Router r;
  const auto params = router_params(r, 4, 6, 1);
  const auto run = run_router(r, params, x, 4, c);
  const double w_rest = 1 / 1.0001, mean = (1e4 + 11 * w_rest) / 12, cap = 10 * mean;
  REQUIRE(cap < 1e4);
  CHECK(run.cache.cap == doctest::Approx(cap).epsilon(1e-12));
  CHECK(run.cache.weights[0] == doctest::Approx(1e4).epsilon(1e-12));  // before the clamp
  CHECK(run.cache.clamped[0] == doctest::Approx(cap).epsilon(1e-12));  // after it
  CHECK(scale(run, 0, 0, 6) == doctest::Approx(cap / ((cap + w_rest) / 2)).epsilon(1e-12));
  CHECK(scale(run, 1, 0, 6) == doctest::Approx(w_rest / ((cap + w_rest) / 2)).epsilon(1e-12));
  for (int q = 1; q < 6; ++q) {
    CHECK(scale(run, 0, q, 6) == doctest::Approx(1.0).epsilon(1e-12));
    CHECK(scale(run, 1, q, 6) == doctest::Approx(1.0).epsilon(1e-12));
  }
}

TEST_CASE("logits: z_tj = sum_q m_{c_t q} x_tq ehat_jq; M = 1 without a previous layer") {
  const Router r{.k = 2};
  const Index E = 5, d = 4;
  auto params = router_params(r, E, d, 3);
  auto e = params.matrix("router.embedding");
  e(2, 0) *= 5;  // a non-unit norm, so the normalisation matters
  const auto x = random_matrix<double>(8, d, 4);
  const std::vector<int> c{0, 1, 0, 2, -1, 1, 2, 0};
  for (const bool clustered : {false, true}) {
    CAPTURE(clustered);
    const auto run =
        run_router(r, params, x, E, clustered ? std::span<const int>(c) : std::span<const int>());
    for (Index t = 0; t < 8; ++t)
      for (Index j = 0; j < E; ++j) {
        double norm = 0;
        for (Index q = 0; q < d; ++q) norm += e(j, q) * e(j, q);
        norm = std::max(std::sqrt(norm), 1e-4);
        double z = 0;
        for (Index q = 0; q < d; ++q) {
          const double m = clustered && c[t] >= 0 ? scale(run, c[t], q, d) : 1.0;
          z += m * x(t, q) * e(j, q) / norm;
        }
        CHECK(run.sel.logits[static_cast<std::size_t>(t * E + j)] ==
              doctest::Approx(z).epsilon(1e-12));
      }
  }
}

TEST_CASE("dx through the clustered logits (M held fixed) matches finite differences") {
  const Router r{.k = 2, .softmax_over_selected = true};
  const Index E = 4, d = 3, T = 7;
  const auto params = router_params(r, E, d, 5);
  const auto x = random_matrix<double>(T, d, 6);
  const std::vector<int> c{0, 1, 0, 2, -1, 2, 0};  // cluster ids, one token without
  auto run = run_router(r, params, x, E, c);
  const auto rg = random_matrix<double>(T, E, 7);  // dL/dG
  // Analytic: the router's backward.
  Mat<double> dx = Mat<double>::Zero(T, d);
  auto grads = params.zeros_like();
  std::vector<double> dlogits(static_cast<std::size_t>(T * E));
  r.backward(B(1), ConstMatrixView<double>(x), params, run.sel, run.cache, rg.data(), dx.data(),
             grads, dlogits.data());
  // Reference: z(x') = (m_c * x') Ehat^T with the forward's M, gated by the
  // library's (separately tested) TopKGating; L = <R, G(z(x'))>.
  const auto unit = run.cache.unit;
  const auto loss = [&](const Mat<double>& xp) {
    RouterRun probe;
    probe.sel.tokens = T;
    probe.sel.experts = E;
    router::TopKGating::resize_logits(probe.sel, T, E);
    for (Index t = 0; t < T; ++t)
      for (Index j = 0; j < E; ++j) {
        double z = 0;
        for (Index q = 0; q < d; ++q)
          z += (c[t] >= 0 ? scale(run, c[t], q, d) : 1.0) * xp(t, q) * unit[j * d + q];
        probe.sel.logits[static_cast<std::size_t>(t * E + j)] = z;
      }
    r.gating().forward(B(1), Mode::train, T, E, probe.sel, probe.cache);
    double l = 0;
    for (Index i = 0; i < T * E; ++i)
      l += rg.data()[i] * probe.sel.gates[static_cast<std::size_t>(i)];
    return l;
  };
  std::vector<double> a(dx.data(), dx.data() + dx.size()), n(a.size());
  Mat<double> xp = x;
  for (Index i = 0; i < x.size(); ++i) {
    const double keep = xp.data()[i], h = 1e-5;
    xp.data()[i] = keep + h;
    const double up = loss(xp);
    xp.data()[i] = keep - h;
    const double down = loss(xp);
    xp.data()[i] = keep;
    n[static_cast<std::size_t>(i)] = (up - down) / (2 * h);
  }
  const auto report = compare("dx", a, n);
  CAPTURE(report.relative());
  CHECK(report.passes());
  CHECK(report.scale > 1e-3);
}

TEST_CASE_TEMPLATE("AdaptiveCluster layer backward matches finite differences", Act, act::ReLU,
                   act::GELU, act::SwiGLU) {
  using L = Layer<Router, estimator::Sparse, cpu::Backend<double>, Act>;
  const std::vector<int> c{1, 0, 1, 3, 3, 0, -1};  // cluster 2 empty, one token without
  for (int k : {1, 2, 4}) {
    for (const bool over_selected : {true, false}) {
      CAPTURE(k);
      CAPTURE(over_selected);
      L layer(
          {.d_model = 5, .d_ff = 4, .experts = 4},
          Router{
              .k = k, .softmax_over_selected = over_selected, .aux_coef = 0.05, .init_gain = 3.0},
          {}, 8);
      const auto x = random_matrix<double>(7, 5, 1), r = random_matrix<double>(7, 5, 2);
      // Without a previous layer M = 1 is constant: every block, dx included.
      for (const auto& report : check_gradients(layer, x, r, Mode::eval)) {
        CAPTURE(report.block);
        CAPTURE(report.relative());
        CHECK(report.passes());
      }
      // With clusters M depends on x without a gradient (by design), so only
      // the parameter blocks are compared here; dx is the test above.
      L clustered = layer;
      Mat<double> y(7, 5), dx(7, 5);
      typename L::Cache cache;
      const ForwardContext ctx{.previous_assignment = c};
      clustered.forward(x, y, cache, Mode::eval, ctx);
      auto grads = clustered.make_gradients();
      clustered.backward(x, cache, r, dx, grads);
      for (const auto& spec : layer.parameters().layout().specs()) {
        CAPTURE(spec.name);
        L perturbed = layer;
        auto p = perturbed.parameters()[spec.name];
        std::vector<double> a(grads[spec.name].begin(), grads[spec.name].end()), n(a.size());
        for (std::size_t i = 0; i < p.size(); ++i) {
          const double keep = p[i], h = 1e-5;
          const auto eval = [&] {
            L copy = perturbed;
            typename L::Cache cc;
            Mat<double> yy(7, 5);
            copy.forward(x, yy, cc, Mode::eval, ctx);
            return (r.array() * yy.array()).sum() + cc.stats().aux_loss;
          };
          p[i] = keep + h;
          const double up = eval();
          p[i] = keep - h;
          const double down = eval();
          p[i] = keep;
          n[i] = (up - down) / (2 * h);
        }
        const auto report = compare(spec.name, a, n);
        CAPTURE(report.relative());
        CHECK(report.passes());
      }
    }
  }
}

TEST_CASE("orthogonal init with gain 0.32, chaining layers, and bad assignments") {
  const Router r;
  const auto rows = router_params(r, 4, 8, 2);  // E <= d: orthonormal rows x 0.32
  const auto e = rows.matrix("router.embedding");
  for (Index a = 0; a < 4; ++a)
    for (Index b = 0; b < 4; ++b) {
      double dot = 0;
      for (Index q = 0; q < 8; ++q) dot += e(a, q) * e(b, q);
      CHECK(dot == doctest::Approx(a == b ? 0.32 * 0.32 : 0.0).epsilon(1e-12).scale(1));
    }
  const auto cols = router_params(r, 8, 3, 2);  // E > d: orthonormal columns x 0.32
  const auto f = cols.matrix("router.embedding");
  for (Index a = 0; a < 3; ++a)
    for (Index b = 0; b < 3; ++b) {
      double dot = 0;
      for (Index j = 0; j < 8; ++j) dot += f(j, a) * f(j, b);
      CHECK(dot == doctest::Approx(a == b ? 0.32 * 0.32 : 0.0).epsilon(1e-12).scale(1));
    }

  // Chaining: the first layer's top-1 assignment feeds the second's router.
  using First = Layer<router::TopK, estimator::Sparse, cpu::Backend<double>, act::GELU>;
  using Second = Layer<Router, estimator::Sparse, cpu::Backend<double>, act::GELU>;
  First first({.d_model = 6, .d_ff = 5, .experts = 4}, router::TopK{.k = 2}, {}, 1);
  Second second({.d_model = 6, .d_ff = 5, .experts = 4}, Router{}, {}, 2);
  const auto x = random_matrix<double>(10, 6, 3);
  Mat<double> h(10, 6), y(10, 6), y_plain(10, 6), y_none(10, 6);
  First::Cache c1;
  Second::Cache c2;
  first.forward(x, h, c1, Mode::train);
  second.forward(h, y, c2, Mode::train, {.previous_assignment = c1.top1_assignment()});
  second.forward(h, y_plain, c2, Mode::train);
  const std::vector<int> none(10, -1);  // no token has a cluster: the same as no context
  second.forward(h, y_none, c2, Mode::train, {.previous_assignment = none});
  CHECK(y_none == y_plain);
  CHECK((y - y_plain).norm() > 0);

  const std::vector<int> short_assignment(9, 0), bad(10, 4);
  CHECK_THROWS_WITH_AS(
      second.forward(h, y, c2, Mode::train, {.previous_assignment = short_assignment}),
      doctest::Contains("previous_assignment.size()=9"), Error);
  CHECK_THROWS_WITH_AS(second.forward(h, y, c2, Mode::train, {.previous_assignment = bad}),
                       doctest::Contains("previous_assignment[0]=4"), Error);
}

TEST_CASE("an embedding below the 1e-4 norm floor: its gradient matches finite differences") {
  using L = Layer<Router, estimator::Sparse, cpu::Backend<double>, act::GELU>;
  L layer({.d_model = 4, .d_ff = 3, .experts = 3}, Router{.k = 2, .init_gain = 3.0}, {}, 9);
  auto e = layer.parameters().matrix("router.embedding");
  for (Index q = 0; q < 4; ++q) e(1, q) *= 1e-5;  // |e_1| ~ 3e-5 < 1e-4: ehat_1 = e_1 / 1e-4
  const auto x = random_matrix<double>(6, 4, 1), r = random_matrix<double>(6, 4, 2);
  for (const auto& report : check_gradients(layer, x, r, Mode::eval, 1e-7)) {
    CAPTURE(report.block);
    CAPTURE(report.relative());
    CHECK(report.passes());
  }
}
