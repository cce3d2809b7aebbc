// Behaviour of the composed layer: agreement with an independent dense
// reference, float vs double, bitwise determinism across thread counts and
// runs, the capacity limit, routing statistics, and dropout.

#include <array>
#include <span>
#include <utility>
#if defined(_OPENMP)
#include <omp.h>
#endif
#include <numeric>

#include "support.hpp"

using namespace moe;
using namespace moe::test;

namespace {

template <class Act, class S = double>
using TopKLayer = Layer<router::TopK, estimator::Sparse, cpu::Backend<S>, Act>;

// y_t = sum_{i in A_t} G_ti E_i(x_t), written directly from docs/algorithms.md with
// per-token Eigen products and a std::stable_sort for the top-k: no code
// shared with the layer's routing, dispatch or combine.
template <class Act, class S>
Mat<double> reference_forward(const TopKLayer<Act, S>& layer, const Mat<double>& x) {
  const auto& cfg = layer.config();
  const auto& topk = layer.router();
  const auto& p = layer.parameters();
  const Index T = x.rows(), d = cfg.d_model, h = cfg.d_ff, E = cfg.experts;
  const Index wide = Act::kGated ? 2 * h : h;
  Mat<double> y = Mat<double>::Zero(T, d);
  const auto wr = p.matrix("router.weight");
  for (Index t = 0; t < T; ++t) {
    Eigen::VectorXd z(E);
    for (Index e = 0; e < E; ++e) {
      z[e] = topk.bias ? static_cast<double>(p["router.bias"][e]) : 0.0;
      for (Index j = 0; j < d; ++j) z[e] += static_cast<double>(wr(e, j)) * x(t, j);
    }
    const Eigen::VectorXd prob =
        (z.array() - z.maxCoeff()).exp() / (z.array() - z.maxCoeff()).exp().sum();
    std::vector<int> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return z[a] > z[b]; });
    order.resize(topk.k);
    double selected_mass = 0;
    for (int e : order) selected_mass += prob[e];
    for (int e : order) {
      const double gate =
          (topk.renormalize || topk.softmax_over_selected) ? prob[e] / selected_mass : prob[e];
      Eigen::VectorXd pre(wide), hidden(h), out(d);
      for (Index c = 0; c < wide; ++c) {
        pre[c] = 0;
        for (Index j = 0; j < d; ++j)
          pre[c] += x(t, j) * static_cast<double>(p["experts.w1"][(e * d + j) * wide + c]);
      }
      for (Index c = 0; c < h; ++c) {
        if constexpr (Act::kGated) {
          hidden[c] = math::swiglu(pre[c], pre[h + c]);
        } else {
          if (cfg.expert_bias) pre[c] += static_cast<double>(p["experts.b1"][e * h + c]);
          hidden[c] = Act::value(pre[c]);
        }
      }
      for (Index j = 0; j < d; ++j) {
        out[j] = cfg.expert_bias ? static_cast<double>(p["experts.b2"][e * d + j]) : 0.0;
        for (Index c = 0; c < h; ++c)
          out[j] += hidden[c] * static_cast<double>(p["experts.w2"][(e * h + c) * d + j]);
        y(t, j) += gate * out[j];
      }
    }
  }
  return y;
}

template <class L>
struct Run {
  Mat<typename L::Scalar> y, dx;
  TensorBuffer<typename L::Scalar> grads;
  RoutingStats stats;
};

template <class L>
Run<L> run(L& layer, const Mat<typename L::Scalar>& x, const Mat<typename L::Scalar>& dy,
           Mode mode) {
  Run<L> r;
  r.y.resize(x.rows(), x.cols());
  r.dx.resize(x.rows(), x.cols());
  typename L::Cache cache;
  layer.forward(x, r.y, cache, mode);
  r.grads = layer.make_gradients();
  layer.backward(x, cache, dy, r.dx, r.grads);
  r.stats = cache.stats();
  return r;
}

}  // namespace

TEST_CASE_TEMPLATE("forward equals an independent dense reference", Act, act::ReLU, act::GELU,
                   act::SwiGLU) {
  for (int normalization = 0; normalization < 3; ++normalization) {
    for (int k : {1, 3, 6}) {
      CAPTURE(normalization);
      CAPTURE(k);
      router::TopK topk{.k = k,
                        .renormalize = normalization == 1,
                        .softmax_over_selected = normalization == 2,
                        .bias = true,
                        .init_std = 0.5};
      TopKLayer<Act> layer(
          {.d_model = 7, .d_ff = 9, .experts = 6, .expert_bias = Act::kSupportsBias}, topk, {}, 3);
      auto b = layer.parameters()["router.bias"];
      for (std::size_t e = 0; e < b.size(); ++e) b[e] = 0.05 * static_cast<double>(e);
      const auto x = random_matrix<double>(37, 7, 5);
      Mat<double> y(37, 7);
      typename TopKLayer<Act>::Cache cache;
      layer.forward(x, y, cache, Mode::eval);
      const Mat<double> expected = reference_forward(layer, x);
      CHECK((y - expected).norm() <= 1e-12 * expected.norm());
    }
  }
}

TEST_CASE_TEMPLATE("float agrees with double", Act, act::ReLU, act::GELU, act::SwiGLU) {
  LayerConfig cfg{.d_model = 16, .d_ff = 24, .experts = 8, .expert_bias = Act::kSupportsBias};
  router::TopK topk{.k = 2, .bias = true, .z_coef = 0.01};
  TopKLayer<Act, double> ld(cfg, topk, {}, 17);
  TopKLayer<Act, float> lf(cfg, topk, {}, 17);
  // Same seed gives the same draws; copy anyway so the test is about arithmetic.
  for (Index i = 0; i < ld.parameters().size(); ++i)
    lf.parameters().flat()[i] = static_cast<float>(ld.parameters().flat()[i]);
  const auto xd = random_matrix<double>(64, 16, 1), dyd = random_matrix<double>(64, 16, 2);
  const Mat<float> xf = xd.template cast<float>(), dyf = dyd.template cast<float>();
  auto rd = run(ld, xd, dyd, Mode::train);
  auto rf = run(lf, xf, dyf, Mode::train);
  CHECK((rf.y.template cast<double>() - rd.y).norm() <= 1e-5 * rd.y.norm());
  CHECK((rf.dx.template cast<double>() - rd.dx).norm() <= 1e-5 * rd.dx.norm());
  for (const auto& spec : ld.parameters().layout().specs()) {
    CAPTURE(spec.name);
    const auto gd = rd.grads[spec.name];
    const auto gf = rf.grads[spec.name];
    double diff = 0, norm = 0;
    for (std::size_t i = 0; i < gd.size(); ++i) {
      diff += std::pow(static_cast<double>(gf[i]) - gd[i], 2);
      norm += gd[i] * gd[i];
    }
    CHECK(std::sqrt(diff) <= 1e-5 * std::sqrt(norm) + 1e-7);
  }
  CHECK(rf.stats.aux_loss == doctest::Approx(rd.stats.aux_loss).epsilon(1e-5));
}

// A training forward computes the activation with its derivative (one fused
// call), an eval forward the value alone: without dropout both give the same
// bits.
TEST_CASE_TEMPLATE("training and eval forwards agree bitwise without dropout", Act, act::ReLU,
                   act::GELU, act::SwiGLU) {
  const auto x = random_matrix<float>(300, 16, 4);
  TopKLayer<Act, float> layer({.d_model = 16, .d_ff = 24, .experts = 4}, router::TopK{.k = 2}, {},
                              6);
  Mat<float> y_train(300, 16), y_eval(300, 16);
  typename TopKLayer<Act, float>::Cache c1, c2;
  layer.forward(x, y_train, c1, Mode::train);
  layer.forward(x, y_eval, c2, Mode::eval);
  CHECK(same_bits(y_train, y_eval));
}

TEST_CASE_TEMPLATE("bitwise identical for 1 and 2 threads and across runs, for each GEMM engine",
                   Act, act::GELU, act::SwiGLU) {
  LayerConfig cfg{.d_model = 32, .d_ff = 48, .experts = 8, .dropout = 0.1, .capacity_factor = 1.05};
  router::TopK topk{.k = 2, .bias = true, .z_coef = 0.001};
  // Enough rows that experts span several row tiles of the backend: T k / E
  // = T / 4 rows per expert on average, above kTileRows.
  const Index T = 4 * cpu::Backend<float>::kTileRows + 300;
  const auto x = random_matrix<float>(T, 32, 8), dy = random_matrix<float>(T, 32, 9);
  for (const cpu::Gemm engine : gemm_engines()) {
    const std::string engine_name = cpu::to_string(engine);
    CAPTURE(engine_name);
    TopKLayer<Act, float> one(cfg, topk, {}, 5, cpu::Backend<float>(1, engine));
    TopKLayer<Act, float> two(cfg, topk, {}, 5, cpu::Backend<float>(2, engine));
    TopKLayer<Act, float> again(cfg, topk, {}, 5, cpu::Backend<float>(2, engine));
    auto r1 = run(one, x, dy, Mode::train);
    auto r2 = run(two, x, dy, Mode::train);
    auto r3 = run(again, x, dy, Mode::train);
    CHECK(r1.stats.dropped_pairs > 0);
    const auto& load = r1.stats.tokens_per_expert;
    CHECK(*std::max_element(load.begin(), load.end()) > cpu::Backend<float>::kTileRows);
    CHECK(same_bits(r1.y, r2.y));
    CHECK(same_bits(r1.dx, r2.dx));
    CHECK(same_bits(r1.grads.flat(), r2.grads.flat()));
    CHECK(same_bits(r2.y, r3.y));
    CHECK(same_bits(r2.dx, r3.dx));
    CHECK(same_bits(r2.grads.flat(), r3.grads.flat()));
  }
}

TEST_CASE("capacity keeps the first ceil(c T k / E) pairs per expert in token order") {
  using L = TopKLayer<act::ReLU>;
  // Every token prefers expert 0 (bias), then expert 1; capacity = ceil(1 * 8 * 2 / 4) = 4.
  L layer({.d_model = 3, .d_ff = 4, .experts = 4, .capacity_factor = 1.0},
          router::TopK{.k = 2, .bias = true}, {}, 1);
  auto b = layer.parameters()["router.bias"];
  b[0] = 50;
  b[1] = 40;
  CHECK(layer.capacity(8) == 4);
  const auto x = random_matrix<double>(8, 3, 4);
  Mat<double> y(8, 3);
  L::Cache cache;
  layer.forward(x, y, cache, Mode::eval);
  CHECK(cache.stats().dropped_pairs == 8);
  CHECK(cache.stats().selected_pairs == 16);
  CHECK(cache.stats().tokens_per_expert == std::vector<Index>{4, 4, 0, 0});
  // Tokens 4..7 lost both pairs: their output is exactly zero.
  for (Index t = 4; t < 8; ++t) CHECK(y.row(t).norm() == 0);
  for (Index t = 0; t < 4; ++t) CHECK(y.row(t).norm() > 0);
  // Dropless (the default) computes all pairs.
  L dropless({.d_model = 3, .d_ff = 4, .experts = 4}, router::TopK{.k = 2}, {}, 1);
  CHECK(dropless.capacity(8) == -1);
}

TEST_CASE("routing statistics after a forward") {
  TopKLayer<act::GELU> layer({.d_model = 6, .d_ff = 5, .experts = 8}, router::TopK{.k = 3}, {}, 2);
  const auto x = random_matrix<double>(50, 6, 3);
  Mat<double> y(50, 6);
  TopKLayer<act::GELU>::Cache cache;
  CHECK_FALSE(cache.filled());
  layer.forward(x, y, cache, Mode::train);
  const auto& s = cache.stats();
  CHECK(cache.filled());
  CHECK(cache.tokens() == 50);
  CHECK(std::accumulate(s.tokens_per_expert.begin(), s.tokens_per_expert.end(), Index{0}) == 150);
  CHECK(s.selected_pairs == 150);
  CHECK(s.dropped_pairs == 0);
  CHECK(s.zero_gate_fraction == doctest::Approx(1.0 - 3.0 / 8.0));
  CHECK(s.aux_loss > 0);
}

TEST_CASE("dropout: train masks about p of the hidden units, eval is the identity") {
  using L = TopKLayer<act::ReLU>;
  LayerConfig cfg{.d_model = 16, .d_ff = 64, .experts = 4, .dropout = 0.25};
  L layer(cfg, router::TopK{.k = 1}, {}, 8);
  LayerConfig no_dropout_cfg = cfg;
  no_dropout_cfg.dropout = 0;
  L reference(no_dropout_cfg, router::TopK{.k = 1}, {}, 8);
  const auto x = random_matrix<double>(40, 16, 1);
  Mat<double> y_eval(40, 16), y_ref(40, 16), y_a(40, 16), y_b(40, 16);
  L::Cache c1, c2, c3, c4;
  layer.forward(x, y_eval, c1, Mode::eval);
  reference.forward(x, y_ref, c2, Mode::eval);
  CHECK(y_eval == y_ref);  // eval applies no dropout
  layer.forward(x, y_a, c3, Mode::train);
  layer.forward(x, y_b, c4, Mode::train);
  CHECK((y_a - y_ref).norm() > 1e-3);
  CHECK((y_a - y_b).norm() > 1e-3);  // a new mask every training forward
  // Scaling by 1 / (1 - p) keeps the expectation: the mean over many masks
  // approaches the no-dropout output.
  Mat<double> mean = Mat<double>::Zero(40, 16), y(40, 16);
  const int draws = 400;
  for (int i = 0; i < draws; ++i) {
    L::Cache c;
    layer.forward(x, y, c, Mode::train);
    mean += y / draws;
  }
  CHECK((mean - y_ref).norm() < 0.1 * y_ref.norm());
}

TEST_CASE("a cache is reusable and several micro-batches can be in flight") {
  using L = TopKLayer<act::SwiGLU>;
  L layer({.d_model = 8, .d_ff = 8, .experts = 4}, router::TopK{.k = 2}, {}, 4);
  const auto xa = random_matrix<double>(10, 8, 1), xb = random_matrix<double>(6, 8, 2);
  const auto da = random_matrix<double>(10, 8, 3), db = random_matrix<double>(6, 8, 4);
  // Reference: each micro-batch alone.
  L ref_a = layer, ref_b = layer;
  auto ra = run(ref_a, xa, da, Mode::train);
  auto rb = run(ref_b, xb, db, Mode::train);
  // Interleaved: forward a, forward b, backward a, backward b.
  L::Cache ca, cb;
  Mat<double> ya(10, 8), yb(6, 8), dxa(10, 8), dxb(6, 8);
  layer.forward(xa, ya, ca, Mode::train);
  layer.forward(xb, yb, cb, Mode::train);
  auto grads = layer.make_gradients();
  layer.backward(xa, ca, da, dxa, grads);
  layer.backward(xb, cb, db, dxb, grads);
  CHECK(ya == ra.y);
  CHECK(yb == rb.y);
  CHECK(dxa == ra.dx);
  CHECK(dxb == rb.dx);
  // Gradients accumulate: the sum of both micro-batches.
  for (Index i = 0; i < grads.size(); ++i)
    CHECK(grads.flat()[i] ==
          doctest::Approx(ra.grads.flat()[i] + rb.grads.flat()[i]).epsilon(1e-12));
  // Reusing a cache for another batch size.
  layer.forward(xb, yb, ca, Mode::eval);
  CHECK(ca.tokens() == 6);
}

TEST_CASE("frozen router: no router gradient, input gradient still flows") {
  using L = TopKLayer<act::GELU>;
  L layer({.d_model = 5, .d_ff = 4, .experts = 4},
          router::TopK{.k = 2, .bias = true, .frozen = true}, {}, 6);
  L learned({.d_model = 5, .d_ff = 4, .experts = 4}, router::TopK{.k = 2, .bias = true}, {}, 6);
  const auto x = random_matrix<double>(9, 5, 1), dy = random_matrix<double>(9, 5, 2);
  auto frozen_run = run(layer, x, dy, Mode::eval);
  auto learned_run = run(learned, x, dy, Mode::eval);
  for (double g : frozen_run.grads["router.weight"]) CHECK(g == 0);
  for (double g : frozen_run.grads["router.bias"]) CHECK(g == 0);
  CHECK(frozen_run.dx == learned_run.dx);  // same function of x
  CHECK(Eigen::Map<const Eigen::VectorXd>(learned_run.grads["router.weight"].data(), 20).norm() >
        0);
}

TEST_CASE("capacity rounds c T k / E up, and huge factors mean every pair fits") {
  using L = TopKLayer<act::ReLU>;
  L layer({.d_model = 3, .d_ff = 4, .experts = 4, .capacity_factor = 1.1}, router::TopK{.k = 1}, {},
          1);
  CHECK(layer.capacity(10) == 3);  // ceil(1.1 * 10 * 1 / 4) = ceil(2.75)
  CHECK(layer.capacity(7) == 2);   // ceil(1.925)
  L huge({.d_model = 3, .d_ff = 4, .experts = 4, .capacity_factor = 1e30}, router::TopK{.k = 2}, {},
         1);
  CHECK(huge.capacity(8) == 8);
}

TEST_CASE("initialisation follows the documented distributions") {
  // Router N(0, sqrt(2/(5d))); expert weights U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  const Index d = 64, h = 96, E = 16;
  TopKLayer<act::GELU> layer({.d_model = d, .d_ff = h, .experts = E, .expert_bias = true},
                             router::TopK{.k = 2}, {}, 7);
  const auto moments = [](std::span<const double> v) {
    double mean = 0, sq = 0, max_abs = 0;
    for (double x : v) {
      mean += x;
      sq += x * x;
      max_abs = std::max(max_abs, std::abs(x));
    }
    const double n = static_cast<double>(v.size());
    return std::array<double, 3>{mean / n, std::sqrt(sq / n - (mean / n) * (mean / n)), max_abs};
  };
  const auto& p = std::as_const(layer).parameters();
  const auto router = moments(p["router.weight"]);
  CHECK(std::abs(router[0]) < 0.01);
  CHECK(router[1] == doctest::Approx(std::sqrt(2.0 / (5.0 * d))).epsilon(0.05));
  // U(-b, b) has standard deviation b / sqrt(3) and never exceeds b.
  for (const auto& tensor : {std::pair{"experts.w1", d}, std::pair{"experts.b1", d},
                             std::pair{"experts.w2", h}, std::pair{"experts.b2", h}}) {
    const char* name = tensor.first;  // not a binding: clang 14 cannot capture those
    const auto fan_in = tensor.second;
    CAPTURE(name);
    const double bound = 1.0 / std::sqrt(static_cast<double>(fan_in));
    const auto m = moments(p[name]);
    CHECK(m[1] == doctest::Approx(bound / std::sqrt(3.0)).epsilon(name[9] == 'b' ? 0.15 : 0.03));
    CHECK(m[2] <= bound);
    CHECK(m[2] > 0.95 * bound);
  }
  TopKLayer<act::GELU> custom({.d_model = d, .d_ff = h, .experts = E},
                              router::TopK{.k = 2, .init_std = 0.02}, {}, 7);
  CHECK(moments(std::as_const(custom).parameters()["router.weight"])[1] ==
        doctest::Approx(0.02).epsilon(0.05));
}

TEST_CASE("backward uses the router options of its forward, even if k changes in between") {
  using L = TopKLayer<act::GELU>;
  L layer({.d_model = 6, .d_ff = 5, .experts = 4},
          router::TopK{.k = 1, .renormalize = true, .z_coef = 0.1}, {}, 3);
  L reference = layer;
  const auto x = random_matrix<double>(9, 6, 1), dy = random_matrix<double>(9, 6, 2);
  auto expected = run(reference, x, dy, Mode::eval);
  L::Cache cache;
  Mat<double> y(9, 6), dx(9, 6);
  layer.forward(x, y, cache, Mode::eval);
  layer.router().k = 4;  // e.g. a k schedule stepping between forward and backward
  layer.router().renormalize = false;
  layer.router().z_coef = 0;
  auto grads = layer.make_gradients();
  layer.backward(x, cache, dy, dx, grads);
  CHECK(dx == expected.dx);
  CHECK(std::equal(grads.flat().begin(), grads.flat().end(), expected.grads.flat().begin()));
}

#if defined(_OPENMP)
TEST_CASE("bitwise identical at sizes where Eigen would thread its own GEMMs") {
  // Each expert GEMM tile and the router weight gradient are large enough for
  // Eigen's parallel path; the backend must keep them serial, whatever the
  // process's OpenMP setting.
  LayerConfig cfg{.d_model = 128, .d_ff = 256, .experts = 4};
  const auto x = random_matrix<float>(2048, 128, 8), dy = random_matrix<float>(2048, 128, 9);
  const int saved = omp_get_max_threads();
  std::vector<Run<TopKLayer<act::GELU, float>>> runs;
  for (const auto& [backend_threads, omp_threads] :
       {std::pair{1, 1}, std::pair{1, 2}, std::pair{2, 2}, std::pair{2, 1}}) {
    omp_set_num_threads(omp_threads);
    TopKLayer<act::GELU, float> layer(cfg, router::TopK{.k = 2}, {}, 5,
                                      cpu::Backend<float>(backend_threads));
    runs.push_back(run(layer, x, dy, Mode::train));
  }
  omp_set_num_threads(saved);
  for (std::size_t i = 1; i < runs.size(); ++i) {
    CAPTURE(i);
    CHECK(runs[i].y == runs[0].y);
    CHECK(runs[i].dx == runs[0].dx);
    CHECK(std::equal(runs[i].grads.flat().begin(), runs[i].grads.flat().end(),
                     runs[0].grads.flat().begin()));
  }
}
#endif

namespace {
// The layer with Act and with Plain on the same parameters, dropout on.
template <class Act, class Plain, class S>
void check_span_matches_fallback(double tolerance) {
  static_assert(!requires(S * u, S * v) { Plain::value_span(u, v, Index{1}); });
  LayerConfig cfg{.d_model = 16, .d_ff = 40, .experts = 4, .dropout = 0.25};
  TopKLayer<Act, S> with_spans(cfg, router::TopK{.k = 2}, {}, 9);
  TopKLayer<Plain, S> plain(cfg, router::TopK{.k = 2}, {}, 9);
  for (Index i = 0; i < with_spans.parameters().size(); ++i)
    plain.parameters().flat()[i] = with_spans.parameters().flat()[i];
  const auto x = random_matrix<S>(50, 16, 3), dy = random_matrix<S>(50, 16, 4);
  for (Mode mode : {Mode::train, Mode::eval}) {
    CAPTURE(static_cast<int>(mode));
    const auto a = run(with_spans, x, dy, mode), b = run(plain, x, dy, mode);
    CHECK((a.y - b.y).norm() <= tolerance * b.y.norm());
    CHECK((a.dx - b.dx).norm() <= tolerance * b.dx.norm());
    const auto ga = a.grads["experts.w1"], gb = b.grads["experts.w1"];
    double diff = 0, norm = 0;
    for (std::size_t i = 0; i < ga.size(); ++i) {
      diff += std::pow(static_cast<double>(ga[i]) - static_cast<double>(gb[i]), 2);
      norm += std::pow(static_cast<double>(gb[i]), 2);
    }
    CHECK(std::sqrt(diff) <= tolerance * std::sqrt(norm));
  }
}
}  // namespace

// In double the span functions are the scalar formulas: bitwise the same
// layer. In float they are the vectorised ones: the same to rounding.
TEST_CASE("the activation spans and the element-wise fallback give the same layer") {
  check_span_matches_fallback<act::GELU, PlainGELU, double>(0.0);
  check_span_matches_fallback<act::SwiGLU, PlainSwiGLU, double>(0.0);
  check_span_matches_fallback<act::GELU, PlainGELU, float>(1e-5);
  check_span_matches_fallback<act::SwiGLU, PlainSwiGLU, float>(1e-5);
}
