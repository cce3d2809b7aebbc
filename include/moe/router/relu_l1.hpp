#pragma once
// ReLU routing with a load-balanced, adaptive L1 penalty (ReMoE, Wang et al.,
// ICLR 2025; docs/algorithms.md 3.2):
//   z = W_r x (no bias),  G = relu(z),  A_t = {i : z_ti > 0}   (0..E experts per token)
//   L1 = lambda * E / (k T^2) * sum_e n_e sum_t G_te,  n_e = #{t : G_te > 0} (no gradient)
// in training forwards only, with lambda from a LambdaController shared by all
// ReLU layers of the model. A token with no positive logit uses no expert and
// its output is zero; nothing special happens anywhere else.

#include <cmath>
#include <cstdint>
#include <memory>

#include "moe/core/concepts.hpp"
#include "moe/core/error.hpp"
#include "moe/math/random.hpp"
#include "moe/math/relu_gates.hpp"
#include "moe/router/lambda_controller.hpp"

namespace moe::router {

struct ReluL1 {
  std::shared_ptr<LambdaController> controller;  // shared by the model's ReLU layers
  int k = 2;                                     // target active experts: S* and the L1 scale
  double init_std = 0.01;                        // W_r ~ N(0, 0.01^2) [choice: 0.01 is the std]

  static constexpr const char* kName = "relu_l1";

  template <class B>
  struct Cache {
    typename B::template Buffer<Index> active;                // (T) |A_t|
    typename B::template Buffer<double> counts;               // (E) n_e over the whole batch
    typename B::template Buffer<typename B::Scalar> l1_grad;  // (E) dL1/dG_te
    typename B::template Buffer<typename B::Scalar> l1_term;  // (E) expert e's share of L1
  };

  Index nominal_k() const { return k; }

  void validate(const LayerConfig& cfg) const {
    detail::require(controller != nullptr,
                    "moe::router::ReluL1: controller=nullptr, expected a shared "
                    "LambdaController (e.g. LambdaController::for_experts(k, E))");
    detail::require(k >= 1 && k <= cfg.experts, "moe::router::ReluL1: k=", k,
                    ", expected 1 <= k <= experts=", cfg.experts);
    detail::require(std::isfinite(init_std) && init_std > 0,
                    "moe::router::ReluL1: init_std=", init_std, ", expected a finite value > 0");
    const double target = 1.0 - static_cast<double>(k) / static_cast<double>(cfg.experts);
    detail::require(std::abs(controller->target_sparsity() - target) < 1e-12,
                    "moe::router::ReluL1: controller target_sparsity=",
                    controller->target_sparsity(), ", expected 1 - k/E = ", target, " for k=", k,
                    " and experts=", cfg.experts, " (LambdaController::for_experts(k, E))");
  }

  // Takes nothing from a forward's context: any context is fine.
  void check_context(const ForwardContext&, Index, const LayerConfig&) const {}

  void add_parameters(TensorLayout& layout, const LayerConfig& cfg) const {
    layout.add("router.weight", {cfg.experts, cfg.d_model});
  }
  // lambda travels with each layer's state so that a checkpoint restores it.
  void add_state(TensorLayout& layout, const LayerConfig&) const {
    layout.add("router.lambda", {1});
  }

  template <class S>
  void init(TensorBuffer<S>& params, const LayerConfig&, std::uint64_t seed) const {
    auto w = params["router.weight"];
    for (std::size_t i = 0; i < w.size(); ++i)
      w[i] = static_cast<S>(init_std * math::standard_normal(seed, kWeightStream, i));
  }

  template <class B>
  void forward(const B& be, Mode mode, ConstMatrixView<typename B::Scalar> x,
               const TensorBuffer<typename B::Scalar>& params, const ForwardContext& context,
               Selection<typename B::Scalar, B::template Buffer>& sel, Cache<B>& cache) const {
    using S = typename B::Scalar;
    const Index T = x.rows(), d = x.cols(), E = sel.experts;
    const int EE = static_cast<int>(E);
    sel.logits.resize(static_cast<std::size_t>(T * E));
    sel.probabilities.resize(0);  // no softmax: G = relu(z)
    cache.active.resize(static_cast<std::size_t>(T));
    cache.counts.resize(static_cast<std::size_t>(E));
    cache.l1_grad.resize(static_cast<std::size_t>(E));
    cache.l1_term.resize(static_cast<std::size_t>(E));
    sel.gates.resize(static_cast<std::size_t>(T * E));
    sel.token_offsets.resize(static_cast<std::size_t>(T + 1));

    S* z = sel.logits.data();
    be.gemm_rows(true, T, E, d, S(1), x.data(), d, params["router.weight"].data(), d, S(0), z, E);
    S* g = sel.gates.data();
    Index* active = cache.active.data();
    be.parallel_for(
        T,
        [=] MOE_HOST_DEVICE(Index t) {
          active[t] = math::relu_gates_forward(z + t * E, EE, g + t * E);
        },
        T * E);
    const Index pairs = be.offsets_from_counts(active, T, sel.token_offsets.data());
    sel.pair_expert.resize(static_cast<std::size_t>(pairs));
    const Index* offsets = sel.token_offsets.data();
    int* chosen = sel.pair_expert.data();
    be.parallel_for(
        T,
        [=] MOE_HOST_DEVICE(Index t) {
          math::relu_selected(z + t * E, EE, static_cast<int>(active[t]), chosen + offsets[t]);
        },
        T * E * 4);

    // The L1 term trains the sparsity; eval forwards apply none and record
    // none. Its counts n_e, T and the sparsity are the whole batch's (every
    // process of the group).
    const ProcessGroup& group = group_of(context);
    const bool train = mode == Mode::train;
    const double T_all = static_cast<double>(group.sum(T));
    const double lambda = controller->lambda();
    const S scale = train ? static_cast<S>(lambda * static_cast<double>(E) /
                                           (static_cast<double>(k) * T_all * T_all))
                          : S(0);
    double* counts = cache.counts.data();
    S* l1_grad = cache.l1_grad.data();
    S* l1_term = cache.l1_term.data();
    be.parallel_sum_rows(
        E, T, [=] MOE_HOST_DEVICE(Index e, Index t) { return g[t * E + e] > S(0) ? Index{1} : 0; },
        [=] MOE_HOST_DEVICE(Index e, Index n) { counts[e] = static_cast<double>(n); }, T * E);
    group.sum(counts, E);
    be.parallel_for(
        E, [=] MOE_HOST_DEVICE(Index e) { l1_grad[e] = scale * static_cast<S>(counts[e]); }, E);
    be.parallel_sum_rows(
        E, T, [=] MOE_HOST_DEVICE(Index e, Index t) { return g[t * E + e]; },
        [=] MOE_HOST_DEVICE(Index e, S column) { l1_term[e] = l1_grad[e] * column; }, T * E);
    double l1 = 0;
    for (Index e = 0; e < E; ++e) l1 += static_cast<double>(l1_term[e]);
    sel.load_balance_loss = sel.z_loss = 0;
    sel.l1_loss = sel.aux_loss = group.sum(l1);
    if (train) {
      const double pairs_all = static_cast<double>(group.sum(pairs));
      controller->record(1.0 - pairs_all / (T_all * static_cast<double>(E)));
    }
  }

  template <class B>
  void backward(const B& be, ConstMatrixView<typename B::Scalar> x,
                const TensorBuffer<typename B::Scalar>& params,
                const Selection<typename B::Scalar, B::template Buffer>& sel, const Cache<B>& cache,
                const typename B::Scalar* dgates, typename B::Scalar* dx,
                TensorBuffer<typename B::Scalar>& grads, typename B::Scalar* dlogits) const {
    using S = typename B::Scalar;
    const Index T = x.rows(), d = x.cols(), E = sel.experts;
    const int EE = static_cast<int>(E);
    const S* z = sel.logits.data();
    const S* l1_grad = cache.l1_grad.data();
    be.parallel_for(
        T,
        [=] MOE_HOST_DEVICE(Index t) {
          math::relu_gates_backward(z + t * E, dgates + t * E, l1_grad, EE, dlogits + t * E);
        },
        T * E);
    const S* w = params["router.weight"].data();
    be.gemm_rows(false, T, d, E, S(1), dlogits, E, w, d, S(1), dx, d);  // dx += dz W_r
    S* dw = grads["router.weight"].data();
    be.gemm(true, false, E, d, T, S(1), dlogits, E, x.data(), d, S(1), dw, d);  // dW_r += dz^T x
  }

  // After optimiser step `step`: the shared lambda update (once per step).
  void end_step(std::uint64_t step) { controller->end_step(step); }
  // This layer's copy of lambda, for checkpoints, and its way back.
  void save_state(TensorBuffer<double>& state) const {
    state["router.lambda"][0] = controller->lambda();
  }
  void restore(const TensorBuffer<double>& state) {
    controller->set_lambda(state["router.lambda"][0]);
  }

 private:
  static constexpr std::uint64_t kWeightStream = 0x72656c75ull;  // "relu"
};

static_assert(RouterPolicy<ReluL1, archetype::Backend>);

}  // namespace moe::router
