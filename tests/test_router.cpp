// Known answers for the TopK router (docs/algorithms.md 3.1) on a hand-computed
// 3-token, 4-expert case, and for the shared per-token math.

#include <algorithm>

#include "support.hpp"

using namespace moe;
using namespace moe::test;

namespace {

using B = cpu::Backend<double>;

struct RouterRun {
  Selection<double, B::Buffer> sel;
  router::TopK::Cache<B> cache;
};

// W_r = I (d = E = 4), so the logits are the inputs themselves:
//   t0: z = ln[1, 2, 3, 4] -> p = [.1, .2, .3, .4], top-2 = {3, 2}
//   t1: z = ln[4, 3, 2, 1] -> p = [.4, .3, .2, .1], top-2 = {0, 1}
//   t2: z = [0, 0, 0, 0]   -> p = .25 each, a 4-way tie: top-2 = {0, 1}
RouterRun run_router(const router::TopK& topk, TensorBuffer<double>& params, Mat<double>& x,
                     Mode mode = Mode::train) {
  LayerConfig config{.d_model = 4, .d_ff = 1, .experts = 4};
  auto layout = std::make_shared<TensorLayout>();
  topk.add_parameters(*layout, config);
  params = TensorBuffer<double>(layout);
  auto w = params.matrix("router.weight");
  for (Index e = 0; e < 4; ++e) w(e, e) = 1;
  x.resize(3, 4);
  x << std::log(1.0), std::log(2.0), std::log(3.0), std::log(4.0),  //
      std::log(4.0), std::log(3.0), std::log(2.0), std::log(1.0),   //
      0, 0, 0, 0;
  RouterRun run;
  run.sel.tokens = 3;
  run.sel.experts = 4;
  topk.forward(B(1), mode, ConstMatrixView<double>(x), params, {}, run.sel, run.cache);
  return run;
}

}  // namespace

TEST_CASE("TopK gates and aux loss on a hand-computed 3-token, 4-expert case") {
  TensorBuffer<double> params;
  Mat<double> x;

  SUBCASE("plain softmax gates (Switch, Default MoE)") {
    auto run = run_router(router::TopK{.k = 2, .aux_coef = 0.01}, params, x);
    const std::vector<int> chosen{3, 2, 0, 1, 0, 1};
    CHECK(std::vector<int>(run.sel.pair_expert.begin(), run.sel.pair_expert.end()) == chosen);
    CHECK(std::vector<Index>(run.sel.token_offsets.begin(), run.sel.token_offsets.end()) ==
          std::vector<Index>{0, 2, 4, 6});
    const double expected[3][4] = {{.1, .2, .3, .4}, {.4, .3, .2, .1}, {.25, .25, .25, .25}};
    for (int t = 0; t < 3; ++t)
      for (int e = 0; e < 4; ++e)
        CHECK(run.sel.gates[t * 4 + e] == doctest::Approx(expected[t][e]).epsilon(1e-14));
    // c = [2, 2, 1, 1], sum_t p_te = .75 for every e:
    // aux = 0.01 * 4 / (2 * 9) * (2 + 2 + 1 + 1) * .75 = 0.01.
    CHECK(run.sel.aux_loss == doctest::Approx(0.01).epsilon(1e-14));
  }
  SUBCASE("renormalize (Mixtral) and softmax over selected give p_i / sum_A p_j on A") {
    for (int mode = 0; mode < 2; ++mode) {
      router::TopK topk{.k = 2, .renormalize = mode == 0, .softmax_over_selected = mode == 1};
      auto run = run_router(topk, params, x);
      // Off A: renormalised gates keep G~ = p (Default MoE's dense gate),
      // a softmax over the selected has none.
      const double off = mode == 0 ? 1 : 0;
      const double expected[3][4] = {{off * .1, off * .2, 3. / 7, 4. / 7},
                                     {4. / 7, 3. / 7, off * .2, off * .1},
                                     {.5, .5, off * .25, off * .25}};
      for (int t = 0; t < 3; ++t)
        for (int e = 0; e < 4; ++e)
          CHECK(run.sel.gates[t * 4 + e] == doctest::Approx(expected[t][e]).epsilon(1e-14));
    }
  }
  SUBCASE("z-loss = z_coef * mean_t logsumexp(z_t)^2") {
    auto run = run_router(router::TopK{.k = 2, .aux_coef = 0, .z_coef = 0.5}, params, x);
    const double l10 = std::log(10.0), l4 = std::log(4.0);
    CHECK(run.sel.aux_loss == doctest::Approx(0.5 * (2 * l10 * l10 + l4 * l4) / 3).epsilon(1e-14));
    CHECK(run.sel.z_loss == run.sel.aux_loss);
    CHECK(run.sel.load_balance_loss == 0);
  }
  SUBCASE("the parts add up: aux = load balancing + z-loss") {
    auto run = run_router(router::TopK{.k = 2, .aux_coef = 0.01, .z_coef = 0.5}, params, x);
    CHECK(run.sel.load_balance_loss == doctest::Approx(0.01).epsilon(1e-14));
    CHECK(run.sel.aux_loss == run.sel.load_balance_loss + run.sel.z_loss);
    CHECK(run.sel.l1_loss == 0);
  }
  SUBCASE("eval forwards carry no training loss, and their backward adds none") {
    const router::TopK topk{.k = 2, .aux_coef = 0.5, .z_coef = 0.5};
    auto run = run_router(topk, params, x, Mode::eval);
    CHECK(run.sel.aux_loss == 0);
    CHECK(run.sel.load_balance_loss == 0);
    CHECK(run.sel.z_loss == 0);
    // dL/dG = 0: without training losses, dL/dz is 0 too.
    const std::vector<double> dg(12, 0.0);
    std::vector<double> dz(12, 7.0);
    router::TopKGating::backward(B(1), run.sel, run.cache, dg.data(), dz.data());
    for (double v : dz) CHECK(v == 0);
    auto train = run_router(topk, params, x, Mode::train);
    router::TopKGating::backward(B(1), train.sel, train.cache, dg.data(), dz.data());
    CHECK(std::any_of(dz.begin(), dz.end(), [](double v) { return v != 0; }));
  }
  SUBCASE("k = 1 and k = E") {
    auto one = run_router(router::TopK{.k = 1, .aux_coef = 1}, params, x);
    CHECK(std::vector<int>(one.sel.pair_expert.begin(), one.sel.pair_expert.end()) ==
          std::vector<int>{3, 0, 0});
    // c = [2, 0, 0, 1]: aux = 4 / (1 * 9) * (2 + 1) * .75 = 1.
    CHECK(one.sel.aux_loss == doctest::Approx(1.0).epsilon(1e-14));
    auto all = run_router(router::TopK{.k = 4, .aux_coef = 1}, params, x);
    CHECK(std::vector<int>(all.sel.pair_expert.begin(), all.sel.pair_expert.begin() + 4) ==
          std::vector<int>{3, 2, 1, 0});
    // c = 3 for every e: aux = 4 / (4 * 9) * 3 * 4 * .75 = 1 (its minimum, balanced).
    CHECK(all.sel.aux_loss == doctest::Approx(1.0).epsilon(1e-14));
  }
}

// dL/dz from dL/dG for every entry, on and off the selection (Default MoE and
// DenseExact supply the entries off it), against central differences of
// sum_j dg_j G_j(z) with A fixed (z has no near ties, so small steps keep A).
TEST_CASE("the gates' backward over every entry matches central differences") {
  const int E = 6, k = 2;
  const double z0[E] = {0.3, -1.2, 1.7, 0.1, 2.4, -0.5};
  const double dg[E] = {0.7, -0.4, 1.1, 0.25, -0.9, 0.6};
  const double zero[E] = {0, 0, 0, 0, 0, 0};
  const char* names[] = {"plain softmax", "renormalize", "softmax_over_selected"};
  for (int n = 0; n < 3; ++n) {
    CAPTURE(names[n]);
    const auto norm = static_cast<math::GateNormalization>(n);
    const auto objective = [&](const double* z) {
      double p[E], g[E];
      int chosen[k];
      math::topk_gates_forward(z, E, k, norm, p, chosen, g);
      double f = 0;
      for (int j = 0; j < E; ++j) f += dg[j] * g[j];
      return f;
    };
    double p[E], g[E], dz[E];
    int chosen[k];
    math::topk_gates_forward(z0, E, k, norm, p, chosen, g);
    math::topk_gates_backward(p, g, chosen, E, k, norm, dg, zero, 0.0, dz);
    for (int j = 0; j < E; ++j) {
      double zp[E], zm[E];
      std::copy(z0, z0 + E, zp);
      std::copy(z0, z0 + E, zm);
      const double h = 1e-6;
      zp[j] += h;
      zm[j] -= h;
      CAPTURE(j);
      CHECK(dz[j] == doctest::Approx((objective(zp) - objective(zm)) / (2 * h)).epsilon(1e-8));
    }
  }
}

TEST_CASE("top_k: best first, ties broken by lower index, NaN last") {
  const double scores[] = {0.5, 2.0, 0.5, 2.0, -1.0, 0.5};
  int chosen[4];
  math::top_k(scores, 6, 4, chosen);
  CHECK(chosen[0] == 1);
  CHECK(chosen[1] == 3);
  CHECK(chosen[2] == 0);
  CHECK(chosen[3] == 2);
  const double with_nan[] = {std::nan(""), 1.0, 0.0};
  int two[2];
  math::top_k(with_nan, 3, 2, two);
  CHECK(two[0] == 1);
  CHECK(two[1] == 2);
}

TEST_CASE("softmax is stable for large logits and returns logsumexp") {
  const double z[] = {1000.0, 1000.0 + std::log(3.0)};
  double p[2];
  const double lse = math::softmax(z, 2, p);
  CHECK(p[0] == doctest::Approx(0.25));
  CHECK(p[1] == doctest::Approx(0.75));
  CHECK(lse == doctest::Approx(1000.0 + std::log(4.0)));
  CHECK(math::logsumexp(z, 2) == doctest::Approx(lse));
}

TEST_CASE_TEMPLATE("activation derivatives match central differences", S, float, double) {
  const double h = 1e-6;
  for (double u : {-3.0, -0.7, -0.1, 0.2, 0.9, 2.5}) {
    CAPTURE(u);
    const double num_gelu = (math::gelu(u + h) - math::gelu(u - h)) / (2 * h);
    CHECK(math::gelu_derivative(u) == doctest::Approx(num_gelu).epsilon(1e-8));
    CHECK(math::relu_derivative(u) == (u > 0 ? 1.0 : 0.0));
    for (double up : {-1.3, 0.4, 2.0}) {
      double dg, du;
      math::swiglu_partials(u, up, dg, du);
      CHECK(dg == doctest::Approx((math::swiglu(u + h, up) - math::swiglu(u - h, up)) / (2 * h))
                      .epsilon(1e-8));
      CHECK(du == doctest::Approx((math::swiglu(u, up + h) - math::swiglu(u, up - h)) / (2 * h))
                      .epsilon(1e-8));
    }
  }
  // Known values: GELU(1) = Phi(1) = 0.8413447460685429, silu(1) = 1 / (1 + e^-1).
  CHECK(math::gelu(S(1)) == doctest::Approx(0.8413447460685429).epsilon(1e-6));
  CHECK(math::swiglu(S(1), S(2)) == doctest::Approx(2 / (1 + std::exp(-1.0))).epsilon(1e-6));
}

TEST_CASE("counter-based random numbers are reproducible and well spread") {
  double sum = 0, sum_sq = 0;
  const int n = 20000;
  for (int i = 0; i < n; ++i) {
    const double z = math::standard_normal(5, 6, i);
    sum += z;
    sum_sq += z * z;
  }
  CHECK(std::abs(sum / n) < 0.03);
  CHECK(std::abs(sum_sq / n - 1) < 0.05);
  CHECK(math::uniform01(1, 2, 3) == math::uniform01(1, 2, 3));
  CHECK(math::uniform01(1, 2, 3) != math::uniform01(1, 2, 4));
}
