#pragma once
// TopK softmax router (docs/algorithms.md 3.1): Switch (Fedus et al. 2021), GShard,
// Mixtral, and the Default MoE baseline (Panda et al. 2025).
//   z = W_r x (+ b_r),  p = softmax(z),  A = top-k of z (ties: lower index),
//   G = p (default), p / sum_A p (renormalize) or softmax(z_A) (softmax_over_selected).
//   aux = aux_coef * E / (k T^2) * sum_e c_e sum_t p_te   (Switch load balancing)
//       + z_coef * mean_t logsumexp(z_t)^2                (router z-loss, ST-MoE)
// in training forwards only. G off A is p for the plain and renormalised
// gates: Default MoE's dense gate for the experts a token did not select.

#include <cmath>
#include <cstdint>

#include "moe/core/concepts.hpp"
#include "moe/core/error.hpp"
#include "moe/math/random.hpp"
#include "moe/math/topk_gates.hpp"
#include "moe/router/topk_gating.hpp"

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
  using Cache = TopKGating::Cache<B>;

  Index nominal_k() const { return k; }

  TopKGating gating() const { return {k, normalization(), aux_coef, z_coef}; }

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

  // Takes nothing from a forward's context: any context is fine.
  void check_context(const ForwardContext&, Index, const LayerConfig&) const {}

  // No run state: nothing to add, save, restore or advance.
  void add_state(TensorLayout&, const LayerConfig&) const {}
  void save_state(TensorBuffer<double>&) const {}
  void restore(const TensorBuffer<double>&) {}
  void end_step(std::uint64_t) {}

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
  void forward(const B& be, Mode mode, ConstMatrixView<typename B::Scalar> x,
               const TensorBuffer<typename B::Scalar>& params, const ForwardContext& context,
               Selection<typename B::Scalar, B::template Buffer>& sel, Cache<B>& cache) const {
    using S = typename B::Scalar;
    const Index T = x.rows(), d = x.cols(), E = sel.experts;
    TopKGating::resize_logits(sel, T, E);
    S* z = sel.logits.data();
    be.gemm_rows(true, T, E, d, S(1), x.data(), d, params["router.weight"].data(), d, S(0), z,
                 E);  // z = x W_r^T
    if (bias) {
      const S* b = params["router.bias"].data();
      be.parallel_for(
          T,
          [=] MOE_HOST_DEVICE(Index t) {
            for (Index e = 0; e < E; ++e) z[t * E + e] += b[e];
          },
          T * E);
    }
    gating().forward(be, mode, T, E, sel, cache, group_of(context));
  }

  template <class B>
  void backward(const B& be, ConstMatrixView<typename B::Scalar> x,
                const TensorBuffer<typename B::Scalar>& params,
                const Selection<typename B::Scalar, B::template Buffer>& sel, const Cache<B>& cache,
                const typename B::Scalar* dgates, typename B::Scalar* dx,
                TensorBuffer<typename B::Scalar>& grads, typename B::Scalar* dlogits) const {
    using S = typename B::Scalar;
    const Index T = x.rows(), d = x.cols(), E = sel.experts;
    TopKGating::backward(be, sel, cache, dgates, dlogits);
    const S* w = params["router.weight"].data();
    be.gemm_rows(false, T, d, E, S(1), dlogits, E, w, d, S(1), dx, d);  // dx += dz W_r
    if (frozen) return;
    S* dw = grads["router.weight"].data();
    be.gemm(true, false, E, d, T, S(1), dlogits, E, x.data(), d, S(1), dw, d);  // dW_r += dz^T x
    if (bias) {
      S* db = grads["router.bias"].data();
      be.parallel_sum_rows(
          E, T, [=] MOE_HOST_DEVICE(Index e, Index t) { return dlogits[t * E + e]; },
          [=] MOE_HOST_DEVICE(Index e, S sum) { db[e] += sum; }, T * E);
    }
  }

 private:
  static constexpr std::uint64_t kWeightStream = 0x726f75746572ull;  // "router"
};

static_assert(RouterPolicy<TopK, archetype::Backend>);

}  // namespace moe::router
