// Central finite differences in double on L = <R, y> + aux for dx and every
// parameter block: every activation x gate normalisation x k in {1, 2, E}, at
// T = 1, a generic batch with biases, z-loss and aux loss, an expert with no
// tokens, tied router scores, a capacity limit that drops pairs, and dropout.

#include "support.hpp"

using namespace moe;
using namespace moe::test;

namespace {

enum class Tweak { none, dead_expert, tie_selected, tie_unselected };

struct Case {
  const char* name;
  Index tokens, d_model, d_ff, experts;
  int k;  // 0 means k = E
  bool router_bias = false, expert_bias = false;
  double capacity = 0, dropout = 0, aux = 0.01, z = 0;
  Tweak tweak = Tweak::none;
};

const Case kCases[] = {
    {"T=1", 1, 5, 4, 4, 1},
    {"T=1 k=2", 1, 5, 4, 4, 2},
    {"T=1 k=E", 1, 5, 4, 4, 0},
    {"biases, aux and z-loss, k=1", 7, 6, 5, 4, 1, true, true, 0, 0, 0.05, 0.1},
    {"biases, aux and z-loss, k=2", 7, 6, 5, 4, 2, true, true, 0, 0, 0.05, 0.1},
    {"biases, aux and z-loss, k=E", 7, 6, 5, 4, 0, true, true, 0, 0, 0.05, 0.1},
    {"expert with no tokens, k=1", 6, 5, 4, 5, 1, true, false, 0, 0, 0.02, 0, Tweak::dead_expert},
    {"expert with no tokens, k=2", 6, 5, 4, 5, 2, true, false, 0, 0, 0.02, 0, Tweak::dead_expert},
    {"tied scores, both selected, k=2", 5, 4, 3, 4, 2, true, false, 0, 0, 0.01, 0,
     Tweak::tie_selected},
    {"tied scores, both unselected, k=1", 5, 4, 3, 4, 1, true, false, 0, 0, 0.01, 0,
     Tweak::tie_unselected},
    {"tied scores, k=E", 5, 4, 3, 4, 0, true, false, 0, 0, 0.01, 0, Tweak::tie_selected},
    {"capacity drops pairs, k=2", 8, 5, 4, 4, 2, false, true, 0.5, 0, 0.01, 0},
    {"dropout 0.3, k=2", 6, 5, 6, 4, 2, false, true, 0, 0.3, 0.01, 0},
    // More rows per expert than the backend's skinny kernel takes: the GEMM
    // engine (BLAS or Eigen) computes the experts.
    {"experts above the skinny kernel, k=2", 40, 5, 4, 4, 2, true, true, 0, 0, 0.01, 0.01},
};

template <class Layer>
void apply_tweak(Layer& layer, Tweak tweak) {
  auto& p = layer.parameters();
  const Index E = layer.config().experts, d = layer.config().d_model;
  auto w = p.matrix("router.weight");  // (E, d)
  switch (tweak) {
    case Tweak::none:
      break;
    case Tweak::dead_expert:  // a bias no logit can overcome: expert E-1 gets no token
      p["router.bias"][E - 1] = -30;
      break;
    case Tweak::tie_selected:  // experts 0, 1 identical and far ahead of the rest
      for (Index j = 0; j < d; ++j) w(1, j) = w(0, j);
      p["router.bias"][0] = p["router.bias"][1] = 30;
      break;
    case Tweak::tie_unselected:  // experts E-2, E-1 identical and far behind
      for (Index j = 0; j < d; ++j) w(E - 1, j) = w(E - 2, j);
      p["router.bias"][E - 2] = p["router.bias"][E - 1] = -30;
      break;
  }
}

template <class Act>
void check_case(const Case& c, int normalization, cpu::Gemm engine) {
  router::TopK topk{.k = c.k == 0 ? static_cast<int>(c.experts) : c.k,
                    .renormalize = normalization == 1,
                    .softmax_over_selected = normalization == 2,
                    .bias = c.router_bias,
                    .aux_coef = c.aux,
                    .z_coef = c.z,
                    .init_std = 0.7};  // large enough that gates differ visibly
  LayerConfig config{.d_model = c.d_model,
                     .d_ff = c.d_ff,
                     .experts = c.experts,
                     .expert_bias = c.expert_bias && Act::kSupportsBias,
                     .dropout = c.dropout,
                     .capacity_factor = c.capacity};
  using L = Layer<router::TopK, estimator::Sparse, cpu::Backend<double>, Act>;
  L layer(config, topk, {}, /*seed=*/1234 + static_cast<std::uint64_t>(c.tokens),
          cpu::Backend<double>(0, engine));
  if (c.router_bias) {  // start from non-zero router biases so their gradient is exercised
    auto b = layer.parameters()["router.bias"];
    for (std::size_t e = 0; e < b.size(); ++e) b[e] = 0.1 * static_cast<double>(e) - 0.15;
  }
  apply_tweak(layer, c.tweak);
  const auto x = random_matrix<double>(c.tokens, c.d_model, 11);
  const auto r = random_matrix<double>(c.tokens, c.d_model, 12);

  // Training forwards carry the aux and z-loss and dropout; eval forwards
  // neither (and take the activation's unfused path).
  for (const Mode mode : {Mode::train, Mode::eval}) {
    CAPTURE(mode == Mode::train ? "train" : "eval");
    for (const auto& report : check_gradients(layer, x, r, mode)) {
      CAPTURE(report.block);
      CAPTURE(report.relative());
      CAPTURE(report.scale);
      CHECK(report.passes());
    }
  }
  const Mode mode = c.dropout > 0 ? Mode::train : Mode::eval;
  // The case must exercise what it claims.
  typename L::Cache cache;
  Mat<double> y(c.tokens, c.d_model);
  layer.forward(x, y, cache, mode);
  if (c.tweak == Tweak::dead_expert) CHECK(cache.stats().tokens_per_expert.back() == 0);
  if (c.capacity > 0) CHECK(cache.stats().dropped_pairs > 0);
  if (c.tokens * c.k > 2 * c.experts * cpu::Backend<double>::kSkinnyRows) {
    const auto& load = cache.stats().tokens_per_expert;
    CHECK(*std::max_element(load.begin(), load.end()) > cpu::Backend<double>::kSkinnyRows);
  }
}

}  // namespace

TEST_CASE_TEMPLATE("backward matches central finite differences", Act, act::ReLU, act::GELU,
                   act::SwiGLU) {
  const char* names[] = {"plain softmax", "renormalize", "softmax_over_selected"};
  for (const cpu::Gemm engine : gemm_engines()) {
    for (int normalization = 0; normalization < 3; ++normalization) {
      for (const Case& c : kCases) {
        const std::string engine_name = cpu::to_string(engine);
        CAPTURE(engine_name);
        CAPTURE(names[normalization]);
        CAPTURE(c.name);
        check_case<Act>(c, normalization, engine);
      }
    }
  }
}

TEST_CASE("an activation without the fused value_and_derivative: training forward's fallback") {
  for (const Case& c : kCases) {
    if (c.dropout == 0) continue;  // dropout > 0 runs Mode::train, the fused path
    CAPTURE(c.name);
    check_case<PlainGELU>(c, 0, cpu::Gemm::automatic);
  }
}

// The checker itself must be able to fail: a wrong gradient is caught.
TEST_CASE("the finite-difference check detects a wrong gradient") {
  std::vector<double> a{1.0, 2.0, 3.0}, b{1.0, 2.0, 3.0 + 1e-4};
  CHECK_FALSE(compare("probe", a, b).passes());
  CHECK(compare("probe", a, a).passes());
}

// With R = 0 the loss is the router's auxiliary loss alone, so its gradient
// is checked on its own and not hidden under the gates' larger gradient. A
// training loss: eval forwards have none (checked below).
TEST_CASE_TEMPLATE("aux and z-loss gradients alone match finite differences", Act, act::GELU,
                   act::SwiGLU) {
  for (int normalization = 0; normalization < 3; ++normalization) {
    for (const auto& coefs : {std::pair{1.0, 0.0}, std::pair{0.0, 1.0}, std::pair{0.5, 0.5}}) {
      const double aux = coefs.first, z = coefs.second;  // clang 14 cannot capture bindings
      CAPTURE(normalization);
      CAPTURE(aux);
      CAPTURE(z);
      router::TopK topk{.k = 2,
                        .renormalize = normalization == 1,
                        .softmax_over_selected = normalization == 2,
                        .bias = true,
                        .aux_coef = aux,
                        .z_coef = z,
                        .init_std = 0.7};
      using L = Layer<router::TopK, estimator::Sparse, cpu::Backend<double>, Act>;
      L layer({.d_model = 5, .d_ff = 3, .experts = 5}, topk, {}, 99);
      const auto x = random_matrix<double>(9, 5, 21);
      const Mat<double> r = Mat<double>::Zero(9, 5);
      for (const auto& report : check_gradients(layer, x, r, Mode::train)) {
        CAPTURE(report.block);
        CAPTURE(report.relative());
        CHECK(report.passes());
        if (report.block == "router.weight") CHECK(report.scale > 1e-3);  // not vacuous
      }
      // Eval: no aux or z-loss, so with R = 0 nothing at all flows back.
      using Cache = typename decltype(layer)::Cache;
      Cache cache;
      Mat<double> y(9, 5), dx(9, 5);
      layer.forward(x, y, cache, Mode::eval);
      CHECK(cache.stats().aux_loss == 0);
      auto grads = layer.make_gradients();
      layer.backward(x, cache, r, dx, grads);
      CHECK(dx.norm() == 0);
      for (double g : grads.flat()) CHECK(g == 0);
    }
  }
}
