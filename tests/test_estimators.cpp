// The gradient estimators of docs/algorithms.md section 4: DefaultEMA (Default MoE)
// and the DenseExact oracle, against hand-computed values, finite differences
// and their relations to Sparse and to the dense mixture.

#include <algorithm>

#include "support.hpp"

using namespace moe;
using namespace moe::test;

namespace {

using B = cpu::Backend<double>;

// One hand-built batch: 4 tokens, 2 experts, d = 2; rows are expert-sorted.
struct FakeBatch {
  std::vector<double> gates, probabilities, out;  // no probabilities: a router without softmax
  std::vector<Index> token_offsets, expert_offsets, row_token;
  std::vector<int> pair_expert;
  EstimatorBatch<double> view() const {
    EstimatorBatch<double> b;
    b.tokens = 4;
    b.experts = 2;
    b.d_model = 2;
    b.gates = gates.data();
    b.probabilities = probabilities.empty() ? nullptr : probabilities.data();
    b.token_offsets = token_offsets.data();
    b.pair_expert = pair_expert.data();
    b.expert_offsets = expert_offsets.data();
    b.row_token = row_token.data();
    b.expert_out = out.data();
    b.rows = expert_offsets.empty() ? 0 : expert_offsets.back();
    return b;
  }
};

TensorBuffer<double> ema_state(const estimator::DefaultEMA& est) {
  auto layout = std::make_shared<TensorLayout>();
  est.add_state(*layout, {.d_model = 2, .d_ff = 1, .experts = 2});
  return TensorBuffer<double>(layout);
}

}  // namespace

TEST_CASE("DefaultEMA: the EMA after three updates, an empty expert and an eval forward") {
  estimator::DefaultEMA est{.beta = 0.5};
  auto state = ema_state(est);
  estimator::DefaultEMA::Cache<B> cache;  // the batch means and which experts moved
  const auto ema = [&](Index e, Index j) { return state.matrix("estimator.ema")(e, j); };
  FakeBatch b;
  b.gates = {.6, .4, .7, .3, .2, .8, .5, .5};  // (T, E)
  b.token_offsets = {0, 1, 2, 3, 4};
  b.pair_expert = {0, 0, 1, 1};

  // Step 1: expert 0 gets rows [1, 2], [3, 4] (tokens 0, 1); expert 1 nothing.
  b.expert_offsets = {0, 2, 2};
  b.row_token = {0, 1};
  b.out = {1, 2, 3, 4};
  est.update_state(B(1), Mode::train, b.view(), state, cache);
  CHECK(ema(0, 0) == 1.0);  // 0.5 * 0 + 0.5 * mean(1, 3)
  CHECK(ema(0, 1) == 1.5);
  CHECK(ema(1, 0) == 0.0);  // empty expert: skipped, not decayed
  CHECK(ema(1, 1) == 0.0);
  CHECK(cache.updated == std::vector<int>{1, 0});
  CHECK(cache.batch_mean[0] == 2.0);  // m_0 = mean(1, 3), mean(2, 4)
  CHECK(cache.batch_mean[1] == 3.0);

  // Step 2: expert 0 row [5, 6] (token 0), expert 1 row [2, 2] (token 2).
  b.expert_offsets = {0, 1, 2};
  b.row_token = {0, 2};
  b.out = {5, 6, 2, 2};
  est.update_state(B(1), Mode::train, b.view(), state, cache);
  CHECK(ema(0, 0) == 3.0);  // 0.5 * 1 + 0.5 * 5
  CHECK(ema(0, 1) == 3.75);
  CHECK(ema(1, 0) == 1.0);
  CHECK(ema(1, 1) == 1.0);

  CHECK(cache.updated == std::vector<int>{1, 1});
  CHECK(cache.batch_mean[2] == 2.0);  // m_1 = [2, 2]

  // An eval forward never updates.
  est.update_state(B(1), Mode::eval, b.view(), state, cache);
  CHECK(ema(0, 0) == 3.0);
  CHECK(ema(1, 0) == 1.0);
  CHECK(cache.updated == std::vector<int>{0, 0});

  // Step 3: expert 0 empty, expert 1 row [4, 0].
  b.expert_offsets = {0, 0, 1};
  b.row_token = {3};
  b.out = {4, 0};
  est.update_state(B(1), Mode::train, b.view(), state, cache);
  CHECK(ema(0, 0) == 3.0);
  CHECK(ema(0, 1) == 3.75);
  CHECK(ema(1, 0) == 2.5);
  CHECK(ema(1, 1) == 0.5);
}

TEST_CASE("DefaultEMA ScoreWeighted: m_i = sum p_ti E_i(x_t) / sum p_ti") {
  estimator::DefaultEMA est{.beta = 0.0,
                            .weighting = estimator::DefaultEMA::Weighting::score_weighted};
  auto state = ema_state(est);
  estimator::DefaultEMA::Cache<B> cache;
  FakeBatch b;
  b.gates = {.6, .4, .2, .8, .5, .5, .1, .9};
  b.token_offsets = {0, 1, 2, 3, 4};
  b.pair_expert = {0, 0, 0, 1};
  b.expert_offsets = {0, 2, 3};
  b.row_token = {0, 1, 3};
  b.out = {1, 0, 0, 1, 3, 3};
  est.update_state(B(1), Mode::train, b.view(), state, cache);
  // Expert 0: (0.6 [1, 0] + 0.2 [0, 1]) / 0.8 = [0.75, 0.25]; expert 1: [3, 3].
  const auto m = state.matrix("estimator.ema");
  CHECK(m(0, 0) == doctest::Approx(0.75));
  CHECK(m(0, 1) == doctest::Approx(0.25));
  CHECK(m(1, 0) == doctest::Approx(3.0));
  // Given the router's probabilities p (renormalised gates differ from p on
  // A), the weights are p, not the gates: p_00 = 0.2, p_10 = 0.6, so
  // m_0 = (0.2 [1, 0] + 0.6 [0, 1]) / 0.8 = [0.25, 0.75].
  b.probabilities = {.2, .8, .6, .4, .5, .5, .1, .9};
  est.update_state(B(1), Mode::train, b.view(), state, cache);
  CHECK(m(0, 0) == doctest::Approx(0.25));
  CHECK(m(0, 1) == doctest::Approx(0.75));
}

TEST_CASE("DefaultEMA forward adds G_ti Ehat_i for unselected experts and its gate gradient") {
  estimator::DefaultEMA est{.beta = 0.9};
  auto state = ema_state(est);
  auto m = state.matrix("estimator.ema");
  m(0, 0) = 1, m(0, 1) = 2, m(1, 0) = -1, m(1, 1) = 3;
  FakeBatch b;
  b.gates = {.6, .4, .7, .3, .2, .8, .5, .5};
  b.token_offsets = {0, 1, 2, 2, 4};  // token 2 selected nothing; token 3 both
  b.pair_expert = {0, 1, 0, 1};
  std::vector<double> y(8, 0.0), dy = {1, 1, 2, 0, 0, 1, 5, 5}, dg(8, -7.0);
  estimator::DefaultEMA::Cache<B> cache;  // the estimator's scratch
  est.add_unselected_outputs(B(1), b.view(), state, cache, y.data());
  // t0 selected {0}: + 0.4 * [-1, 3]; t1 {1}: + 0.7 * [1, 2]; t2 {}: both; t3: nothing.
  const std::vector<double> expected = {-0.4, 1.2, 0.7, 1.4, 0.2 - 0.8, 0.4 + 2.4, 0, 0};
  for (int i = 0; i < 8; ++i) CHECK(y[i] == doctest::Approx(expected[i]));
  est.add_unselected_gate_gradients(B(1), b.view(), state, cache, dy.data(), dg.data());
  // dG_ti = <dy_t, Ehat_i> only for i outside A_t; selected entries untouched.
  const std::vector<double> expected_dg = {-7, 2, 2, -7, 2, 3, -7, -7};
  for (int i = 0; i < 8; ++i) CHECK(dg[i] == doctest::Approx(expected_dg[i]));
}

namespace {

template <class Estimator, class Act>
using L = Layer<router::TopK, Estimator, cpu::Backend<double>, Act>;

template <class Layer>
void warm_ema(Layer& layer, std::uint64_t seed) {
  auto ema = layer.state()["estimator.ema"];
  for (std::size_t i = 0; i < ema.size(); ++i) ema[i] = 2.0 * math::uniform01(seed, 3, i) - 1.0;
}

}  // namespace

TEST_CASE_TEMPLATE("DefaultEMA backward matches finite differences", Act, act::ReLU, act::GELU,
                   act::SwiGLU) {
  // Eval mode: the EMA is state without gradient, so the check holds it fixed.
  for (int k : {1, 2, 4}) {
    for (int normalization = 0; normalization < 3; ++normalization) {
      CAPTURE(k);
      CAPTURE(normalization);
      router::TopK topk{.k = k,
                        .renormalize = normalization == 1,
                        .softmax_over_selected = normalization == 2,
                        .bias = true,
                        .aux_coef = 0.02,
                        .init_std = 0.7};
      L<estimator::DefaultEMA, Act> layer({.d_model = 5, .d_ff = 4, .experts = 4}, topk,
                                          {.beta = 0.9}, 21);
      warm_ema(layer, 4);
      const auto x = random_matrix<double>(6, 5, 1), r = random_matrix<double>(6, 5, 2);
      for (const auto& report : check_gradients(layer, x, r, Mode::eval)) {
        CAPTURE(report.block);
        CAPTURE(report.relative());
        CHECK(report.passes());
      }
    }
  }
}

TEST_CASE("DefaultEMA changes plain and renormalised TopK, not a softmax over the selected") {
  const auto x = random_matrix<double>(12, 6, 1), dy = random_matrix<double>(12, 6, 2);
  for (int normalization = 0; normalization < 3; ++normalization) {
    CAPTURE(normalization);
    router::TopK topk{
        .k = 2, .renormalize = normalization == 1, .softmax_over_selected = normalization == 2};
    LayerConfig cfg{.d_model = 6, .d_ff = 5, .experts = 4};
    L<estimator::DefaultEMA, act::GELU> ema(cfg, topk, {}, 3);
    L<estimator::Sparse, act::GELU> sparse(cfg, topk, {}, 3);
    warm_ema(ema, 9);
    Mat<double> y1(12, 6), y2(12, 6), dx1(12, 6), dx2(12, 6);
    typename decltype(ema)::Cache c1;
    typename decltype(sparse)::Cache c2;
    ema.forward(x, y1, c1, Mode::eval);
    sparse.forward(x, y2, c2, Mode::eval);
    auto g1 = ema.make_gradients();
    auto g2 = sparse.make_gradients();
    ema.backward(x, c1, dy, dx1, g1);
    sparse.backward(x, c2, dy, dx2, g2);
    const double y_gap = (y1 - y2).norm();
    const auto w1 = g1["router.weight"];
    const auto w2 = g2["router.weight"];
    double w_gap = 0;
    for (std::size_t i = 0; i < w1.size(); ++i) w_gap = std::max(w_gap, std::abs(w1[i] - w2[i]));
    if (normalization < 2) {  // G~ = p off A_t: the EMA term is real
      CHECK(y_gap > 1e-3);
      CHECK(w_gap > 1e-6);
      // y_t = Sparse's + sum_{i not in A_t} p_ti Ehat_i, p from the cache.
      const auto p = c1.probabilities();
      const auto ehat = ema.state().matrix("estimator.ema");
      Mat<double> expected = y2;
      for (Index t = 0; t < 12; ++t) {
        const auto chosen = c1.selected_experts(t);
        for (Index i = 0; i < 4; ++i) {
          if (std::find(chosen.begin(), chosen.end(), i) != chosen.end()) continue;
          for (Index j = 0; j < 6; ++j) expected(t, j) += p(t, i) * ehat(i, j);
        }
      }
      CHECK((y1 - expected).norm() <= 1e-12 * y1.norm());
    } else {  // no G~: identical to Sparse
      CHECK(y_gap == 0);
      CHECK(w_gap == 0);
      CHECK(dx1 == dx2);
    }
  }
}

TEST_CASE_TEMPLATE("DenseExact with renormalised TopK: the dense gradient flows through p", Act,
                   act::ReLU, act::SwiGLU) {
  // The unselected experts' dL/dG~ = <g_t, E_i(x_t)> reaches z through G~ = p,
  // so the oracle's router gradient differs from Sparse's (the selected
  // entries are the same); with a softmax over the selected it adds nothing.
  const LayerConfig cfg{.d_model = 6, .d_ff = 4, .experts = 5};
  const auto x = random_matrix<double>(11, 6, 1), dy = random_matrix<double>(11, 6, 2);
  for (const bool renormalize : {true, false}) {
    CAPTURE(renormalize);
    const router::TopK topk{.k = 2,
                            .renormalize = renormalize,
                            .softmax_over_selected = !renormalize,
                            .bias = true,
                            .aux_coef = 0};
    L<estimator::DenseExact, Act> oracle(cfg, topk, {}, 8);
    L<estimator::Sparse, Act> sparse(cfg, topk, {}, 8);
    Mat<double> y(11, 6), dx_o(11, 6), dx_s(11, 6);
    typename decltype(oracle)::Cache co;
    typename decltype(sparse)::Cache cs;
    oracle.forward(x, y, co, Mode::eval);
    sparse.forward(x, y, cs, Mode::eval);
    auto go = oracle.make_gradients(), gs = sparse.make_gradients();
    oracle.backward(x, co, dy, dx_o, go);
    sparse.backward(x, cs, dy, dx_s, gs);
    double gap = 0;
    for (std::size_t i = 0; i < go["router.weight"].size(); ++i)
      gap = std::max(gap, std::abs(go["router.weight"][i] - gs["router.weight"][i]));
    if (renormalize) {
      CHECK(gap > 1e-6);
      // The oracle supplies dL/dG off the selection too: <dy_t, E_i(x_t)>.
      const auto dg = co.gate_gradients();
      const auto chosen = co.selected_experts(0);
      for (Index i = 0; i < 5; ++i) {
        CAPTURE(i);
        CHECK(dg(0, i) != 0);
        if (std::find(chosen.begin(), chosen.end(), i) == chosen.end())
          CHECK(cs.gate_gradients()(0, i) == 0);  // Sparse: none
      }
    } else {
      CHECK(gap <= 1e-12);
    }
  }
}

TEST_CASE("DefaultEMA updates its EMA in training forwards only, before use") {
  L<estimator::DefaultEMA, act::GELU> layer({.d_model = 4, .d_ff = 3, .experts = 3},
                                            router::TopK{.k = 1}, {.beta = 0.0}, 5);
  const auto x = random_matrix<double>(30, 4, 1);
  Mat<double> y(30, 4);
  decltype(layer)::Cache cache;
  layer.forward(x, y, cache, Mode::eval);
  for (double v : layer.state()["estimator.ema"]) CHECK(v == 0);
  layer.forward(x, y, cache, Mode::train);
  // beta = 0: Ehat_i is the mean routed output of this very forward, and the
  // output uses it already (update before use).
  Mat<double> y_eval(30, 4);
  decltype(layer)::Cache eval_cache;
  layer.forward(x, y_eval, eval_cache, Mode::eval);
  CHECK(y == y_eval);
  double norm = 0;
  for (double v : layer.state()["estimator.ema"]) norm += v * v;
  CHECK(norm > 0);
}

TEST_CASE_TEMPLATE("DenseExact: Sparse's forward, the dense mixture's router gradient", Act,
                   act::ReLU, act::SwiGLU) {
  const Index E = 5;
  LayerConfig cfg{.d_model = 6, .d_ff = 4, .experts = E};
  const auto x = random_matrix<double>(11, 6, 1), dy = random_matrix<double>(11, 6, 2);
  // No aux loss: its counts c_e depend on k, so it differs between k=2 and k=E.
  router::TopK two{.k = 2, .bias = true, .aux_coef = 0, .z_coef = 0.05};
  router::TopK all = two;
  all.k = static_cast<int>(E);
  L<estimator::DenseExact, Act> oracle(cfg, two, {}, 8);
  L<estimator::Sparse, Act> sparse(cfg, two, {}, 8);
  L<estimator::Sparse, Act> dense(cfg, all, {}, 8);
  Mat<double> y_oracle(11, 6), y_sparse(11, 6), y_dense(11, 6), dx(11, 6);
  typename decltype(oracle)::Cache co;
  typename decltype(sparse)::Cache cs;
  typename decltype(dense)::Cache cd;
  oracle.forward(x, y_oracle, co, Mode::train);
  sparse.forward(x, y_sparse, cs, Mode::train);
  dense.forward(x, y_dense, cd, Mode::train);
  // Same pairs and order; the experts' GEMMs see other row counts (the oracle
  // computes every expert), and a BLAS may round a row differently then.
  CHECK(y_oracle.isApprox(y_sparse, 1e-13));
  CHECK(co.stats().tokens_per_expert == cs.stats().tokens_per_expert);
  auto go = oracle.make_gradients();
  auto gd = dense.make_gradients();
  oracle.backward(x, co, dy, dx, go);
  dense.backward(x, cd, dy, dx, gd);
  // With plain softmax gates the dense mixture's dL/dz uses <g_t, E_i(x_t)>
  // for every i, exactly what the oracle supplies.
  for (const char* name : {"router.weight", "router.bias"}) {
    CAPTURE(name);
    const auto a = go[name];
    const auto b = gd[name];
    for (std::size_t i = 0; i < a.size(); ++i) CHECK(a[i] == doctest::Approx(b[i]).epsilon(1e-12));
  }
  using Oracle = L<estimator::DenseExact, Act>;
  CHECK_THROWS_AS(Oracle({.d_model = 6, .d_ff = 4, .experts = E, .capacity_factor = 1.0}, two),
                  Error);
}

TEST_CASE("DefaultEMA's backward uses the EMA of its own forward, with micro-batches in flight") {
  L<estimator::DefaultEMA, act::GELU> layer({.d_model = 5, .d_ff = 4, .experts = 4},
                                            router::TopK{.k = 1}, {.beta = 0.5}, 3);
  const auto xa = random_matrix<double>(8, 5, 1), xb = random_matrix<double>(8, 5, 2);
  const auto dy = random_matrix<double>(8, 5, 3);
  auto alone = layer;  // forward(a), backward(a)
  Mat<double> y(8, 5), dx_alone(8, 5), dx(8, 5);
  decltype(layer)::Cache ca, cb, c_alone;
  alone.forward(xa, y, c_alone, Mode::train);
  auto g_alone = alone.make_gradients();
  alone.backward(xa, c_alone, dy, dx_alone, g_alone);
  layer.forward(xa, y, ca, Mode::train);  // forward(a), forward(b) moves the EMA, backward(a)
  layer.forward(xb, y, cb, Mode::train);
  auto g = layer.make_gradients();
  layer.backward(xa, ca, dy, dx, g);
  CHECK(dx == dx_alone);
  CHECK(std::equal(g.flat().begin(), g.flat().end(), g_alone.flat().begin()));
}
