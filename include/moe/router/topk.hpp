#pragma once
// TopK softmax router (ALGORITHMS.md 3.1): Switch (Fedus et al. 2021), GShard,
// Mixtral, and the Default MoE baseline (Panda et al. 2025).
//   z = W_r x (+ b_r),  p = softmax(z),  A = top-k of z (ties: lower index),
//   G = p (default), p / sum_A p (renormalize) or softmax(z_A) (softmax_over_selected).
//   aux = aux_coef * E / (k T^2) * sum_e c_e sum_t p_te   (Switch load balancing)
//       + z_coef * mean_t logsumexp(z_t)^2                (router z-loss, ST-MoE)

#include <cmath>
#include <cstdint>

#include "moe/core/concepts.hpp"
#include "moe/core/error.hpp"
#include "moe/math/random.hpp"
#include "moe/math/topk_gates.hpp"

namespace moe::router {

struct TopK {
  int k = 2;
  bool renormalize = false;
  bool softmax_over_selected = false;
  bool bias = false;
  bool frozen = false;     // no parameter gradient; dL/dx still flows
  double aux_coef = 0.01;  // Switch load-balancing coefficient alpha
  double z_coef = 0.0;     // router z-loss coefficient beta_z
  double init_std = 0.0;   // 0: sqrt(2 / (5 d)), Default MoE's small_init

  static constexpr const char* kName = "topk";

  template <class B>
  struct Cache {
    // The options this forward used: backward must not see a k or a
    // normalisation changed in between (SMoE-Dropout changes k at run time).
    int k = 0;
    math::GateNormalization normalization = math::GateNormalization::full_softmax;
    double z_coef = 0;
    typename B::template Buffer<typename B::Scalar> logits;    // (T, E)
    typename B::template Buffer<typename B::Scalar> probs;     // (T, E) softmax over all E
    typename B::template Buffer<typename B::Scalar> lse;       // (T) logsumexp(z_t)
    typename B::template Buffer<typename B::Scalar> aux_grad;  // (E) dAux/dp_te, same for all t
    typename B::template Buffer<typename B::Scalar> aux_term;  // (E) expert e's share of aux
  };

  Index nominal_k() const { return k; }

  math::GateNormalization normalization() const {
    if (softmax_over_selected) return math::GateNormalization::softmax_over_selected;
    if (renormalize) return math::GateNormalization::renormalize;
    return math::GateNormalization::full_softmax;
  }

  void validate(const LayerConfig& cfg) const {
    detail::require(k >= 1 && k <= cfg.experts, "moe::router::TopK: k=", k,
                    ", expected 1 <= k <= experts=", cfg.experts);
    detail::require(!(renormalize && softmax_over_selected),
                    "moe::router::TopK: renormalize=true and softmax_over_selected=true, expected "
                    "at most one of them");
    detail::require(std::isfinite(aux_coef) && aux_coef >= 0,
                    "moe::router::TopK: aux_coef=", aux_coef, ", expected a finite value >= 0");
    detail::require(std::isfinite(z_coef) && z_coef >= 0, "moe::router::TopK: z_coef=", z_coef,
                    ", expected a finite value >= 0");
    detail::require(std::isfinite(init_std) && init_std >= 0,
                    "moe::router::TopK: init_std=", init_std, ", expected a finite value >= 0");
  }

  void add_parameters(TensorLayout& layout, const LayerConfig& cfg) const {
    layout.add("router.weight", {cfg.experts, cfg.d_model}, !frozen);  // (E, d)
    if (bias) layout.add("router.bias", {cfg.experts}, !frozen);
  }

  template <class S>
  void init(TensorBuffer<S>& params, const LayerConfig& cfg, std::uint64_t seed) const {
    const double std_dev =
        init_std > 0 ? init_std : std::sqrt(2.0 / (5.0 * static_cast<double>(cfg.d_model)));
    auto w = params["router.weight"];
    for (std::size_t i = 0; i < w.size(); ++i)
      w[i] = static_cast<S>(std_dev * math::standard_normal(seed, kWeightStream, i));
    if (bias) {
      auto b = params["router.bias"];
      for (auto& v : b) v = S(0);
    }
  }

  template <class B>
  void forward(const B& be, Mode /*mode*/, ConstMatrixView<typename B::Scalar> x,
               const TensorBuffer<typename B::Scalar>& params, const ForwardContext& /*context*/,
               Selection<typename B::Scalar, B::template Buffer>& sel, Cache<B>& cache) const {
    using S = typename B::Scalar;
    const Index T = x.rows(), d = x.cols(), E = sel.experts;
    const int kk = k, EE = static_cast<int>(E);
    cache.k = k;
    cache.normalization = normalization();
    cache.z_coef = z_coef;
    cache.logits.resize(static_cast<std::size_t>(T * E));
    cache.probs.resize(static_cast<std::size_t>(T * E));
    cache.lse.resize(static_cast<std::size_t>(T));
    cache.aux_grad.resize(static_cast<std::size_t>(E));
    cache.aux_term.resize(static_cast<std::size_t>(E));
    sel.gates.resize(static_cast<std::size_t>(T * E));
    sel.token_offsets.resize(static_cast<std::size_t>(T + 1));
    sel.pair_expert.resize(static_cast<std::size_t>(T * k));

    // z = x W_r^T (+ b_r)
    S* z = cache.logits.data();
    be.gemm_rows(true, T, E, d, S(1), x.data(), d, params["router.weight"].data(), d, S(0), z, E);
    const S* b = bias ? params["router.bias"].data() : nullptr;
    S* p = cache.probs.data();
    S* g = sel.gates.data();
    S* lse = cache.lse.data();
    int* chosen = sel.pair_expert.data();
    Index* offsets = sel.token_offsets.data();
    const auto norm = normalization();
    be.parallel_for(
        T,
        [=](Index t) {
          S* zt = z + t * E;
          if (b != nullptr)
            for (Index e = 0; e < E; ++e) zt[e] += b[e];
          lse[t] =
              math::topk_gates_forward(zt, EE, kk, norm, p + t * E, chosen + t * kk, g + t * E);
          offsets[t] = t * kk;
          if (t == 0) offsets[T] = T * kk;
        },
        T * E * (8 + kk));

    // Selection is the top-k of z rather than of p [choice]: the same set
    // except where float underflow makes distinct logits' p tie, where z
    // still ranks them (SMoE-Dropout also selects on logits).
    // Switch load balancing: c_e counts selections (no gradient), so the
    // gradient w.r.t. p_te is the constant aux_grad_e = alpha E c_e / (k T^2).
    // Each expert's term is reduced in token order, then the E terms in
    // expert order: deterministic for any thread count.
    S* aux_grad = cache.aux_grad.data();
    S* aux_term = cache.aux_term.data();
    const S scale =
        static_cast<S>(aux_coef * static_cast<double>(E) /
                       (static_cast<double>(k) * static_cast<double>(T) * static_cast<double>(T)));
    be.parallel_for(
        E,
        [=](Index e) {
          Index count = 0;
          for (Index q = 0; q < T * kk; ++q) count += chosen[q] == e ? 1 : 0;
          S column = 0;
          for (Index t = 0; t < T; ++t) column += p[t * E + e];
          aux_grad[e] = scale * static_cast<S>(count);
          aux_term[e] = aux_grad[e] * column;
        },
        T * kk * E);
    double aux = 0;
    for (Index e = 0; e < E; ++e) aux += static_cast<double>(aux_term[e]);
    if (z_coef > 0) {
      double zl = 0;
      for (Index t = 0; t < T; ++t) zl += static_cast<double>(lse[t]) * static_cast<double>(lse[t]);
      aux += z_coef * zl / static_cast<double>(T);
    }
    sel.aux_loss = aux;
  }

  template <class B>
  void backward(const B& be, ConstMatrixView<typename B::Scalar> x,
                const TensorBuffer<typename B::Scalar>& params,
                const Selection<typename B::Scalar, B::template Buffer>& sel, const Cache<B>& cache,
                const typename B::Scalar* dgates, typename B::Scalar* dx,
                TensorBuffer<typename B::Scalar>& grads, typename B::Scalar* dlogits) const {
    using S = typename B::Scalar;
    const Index T = x.rows(), d = x.cols(), E = sel.experts;
    const int kk = cache.k, EE = static_cast<int>(E);
    const S* p = cache.probs.data();
    const S* g = sel.gates.data();
    const S* lse = cache.lse.data();
    const S* aux_grad = cache.aux_grad.data();
    const int* chosen = sel.pair_expert.data();
    const auto norm = cache.normalization;
    const S zc_scale = static_cast<S>(2.0 * cache.z_coef / static_cast<double>(T));
    be.parallel_for(
        T,
        [=](Index t) {
          math::topk_gates_backward(p + t * E, g + t * E, chosen + t * kk, EE, kk, norm,
                                    dgates + t * E, aux_grad, zc_scale * lse[t], dlogits + t * E);
        },
        T * E * 8);
    const S* w = params["router.weight"].data();
    be.gemm_rows(false, T, d, E, S(1), dlogits, E, w, d, S(1), dx, d);  // dx += dz W_r
    if (frozen) return;
    S* dw = grads["router.weight"].data();
    be.gemm(true, false, E, d, T, S(1), dlogits, E, x.data(), d, S(1), dw, d);  // dW_r += dz^T x
    if (bias) {
      S* db = grads["router.bias"].data();
      be.parallel_for(
          E,
          [=](Index e) {
            S sum = 0;
            for (Index t = 0; t < T; ++t) sum += dlogits[t * E + e];
            db[e] += sum;
          },
          T * E);
    }
  }

 private:
  static constexpr std::uint64_t kWeightStream = 0x726f75746572ull;  // "router"
};

static_assert(RouterPolicy<TopK, archetype::Backend>);

}  // namespace moe::router
