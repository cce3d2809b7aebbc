#pragma once
// The top-k gating every top-k router shares (docs/algorithms.md 3.1), from
// logits on: p = softmax(z), A = top-k of z (ties: lower index), gates G by
// the chosen normalisation, and in training forwards the Switch
// load-balancing loss and the z-loss; and back from dL/dG to dL/dz. TopK
// computes its logits as W_r x (+ b_r), AdaptiveCluster as cluster-weighted
// cosine scores; both write them to sel.logits and hand over to TopKGating.

#include "moe/core/concepts.hpp"
#include "moe/core/process_group.hpp"
#include "moe/math/topk_gates.hpp"

namespace moe::router {

struct TopKGating {
  int k = 2;
  math::GateNormalization normalization = math::GateNormalization::full_softmax;
  double aux_coef = 0.0;
  double z_coef = 0.0;

  // Filled by forward; backward reads the options stored here, not the
  // router's current ones (k may change in between). In eval forwards there
  // are no training losses: aux_grad is 0 and z_coef 0.
  template <class B>
  struct Cache {
    int k = 0;
    math::GateNormalization normalization = math::GateNormalization::full_softmax;
    double z_coef = 0;
    Index batch_tokens = 0;  // T of the whole batch (every process of the group)
    typename B::template Buffer<typename B::Scalar> lse;       // (T) logsumexp(z_t)
    typename B::template Buffer<double> counts;                // (E) c_e over the whole batch
    typename B::template Buffer<typename B::Scalar> aux_grad;  // (E) dAux/dp_te, same for all t
    typename B::template Buffer<typename B::Scalar> aux_term;  // (E) expert e's share of aux
  };

  template <class S, template <class> class Buffer>
  static void resize_logits(Selection<S, Buffer>& sel, Index T, Index E) {
    sel.logits.resize(static_cast<std::size_t>(T * E));
  }

  // sel.logits (T, E) -> sel (probabilities, gates, pairs, losses). The
  // losses' statistics are over the group's whole batch (this process's T
  // tokens are part of it).
  template <class B>
  void forward(const B& be, Mode mode, Index T, Index E,
               Selection<typename B::Scalar, B::template Buffer>& sel, Cache<B>& cache,
               const ProcessGroup& group = single_process()) const {
    using S = typename B::Scalar;
    const int kk = k, EE = static_cast<int>(E);
    const bool train = mode == Mode::train;
    cache.k = k;
    cache.normalization = normalization;
    cache.z_coef = train ? z_coef : 0.0;
    sel.probabilities.resize(static_cast<std::size_t>(T * E));
    cache.lse.resize(static_cast<std::size_t>(T));
    cache.counts.resize(static_cast<std::size_t>(E));
    cache.aux_grad.resize(static_cast<std::size_t>(E));
    cache.aux_term.resize(static_cast<std::size_t>(E));
    sel.gates.resize(static_cast<std::size_t>(T * E));
    sel.token_offsets.resize(static_cast<std::size_t>(T + 1));
    sel.pair_expert.resize(static_cast<std::size_t>(T * k));

    const S* z = sel.logits.data();
    S* p = sel.probabilities.data();
    S* g = sel.gates.data();
    S* lse = cache.lse.data();
    int* chosen = sel.pair_expert.data();
    Index* offsets = sel.token_offsets.data();
    const auto norm = normalization;
    // Selection is the top-k of z rather than of p [choice]: the same set
    // except where float underflow makes distinct logits' p tie, where z
    // still ranks them (SMoE-Dropout also selects on logits).
    be.parallel_for(
        T,
        [=] MOE_HOST_DEVICE(Index t) {
          lse[t] = math::topk_gates_forward(z + t * E, EE, kk, norm, p + t * E, chosen + t * kk,
                                            g + t * E);
          offsets[t] = t * kk;
          if (t == 0) offsets[T] = T * kk;
        },
        T * E * (8 + kk));

    losses(be, train, T, E, sel, cache, group);
  }

  // Switch load balancing: c_e counts selections (no gradient), so the
  // gradient w.r.t. p_te is the constant aux_grad_e = alpha E c_e / (k T^2).
  // Each expert's term is reduced in token order, then the E terms in
  // expert order: deterministic for any thread count. Then the z-loss.
  // Training losses only: an eval forward has none, and its backward adds none.
  template <class B>
  void losses(const B& be, bool train, Index T, Index E,
              Selection<typename B::Scalar, B::template Buffer>& sel, Cache<B>& cache,
              const ProcessGroup& group) const {
    using S = typename B::Scalar;
    S* aux_grad = cache.aux_grad.data();
    S* aux_term = cache.aux_term.data();
    sel.load_balance_loss = sel.z_loss = sel.l1_loss = sel.aux_loss = 0;
    cache.batch_tokens = group.sum(T);
    if (!train) {
      be.parallel_for(
          E, [=] MOE_HOST_DEVICE(Index e) { aux_grad[e] = S(0); }, E);
      return;
    }
    const int kk = k;
    const int* chosen = sel.pair_expert.data();
    const S* p = sel.probabilities.data();
    const double T_all = static_cast<double>(cache.batch_tokens);
    const S scale = static_cast<S>(aux_coef * static_cast<double>(E) /
                                   (static_cast<double>(k) * T_all * T_all));
    double* counts = cache.counts.data();
    be.parallel_sum_rows(
        E, T * kk, [=] MOE_HOST_DEVICE(Index e, Index q) { return chosen[q] == e ? Index{1} : 0; },
        [=] MOE_HOST_DEVICE(Index e, Index count) { counts[e] = static_cast<double>(count); },
        T * kk * E);
    group.sum(counts, E);  // c_e of the whole batch
    be.parallel_for(
        E, [=] MOE_HOST_DEVICE(Index e) { aux_grad[e] = scale * static_cast<S>(counts[e]); }, E);
    be.parallel_sum_rows(
        E, T, [=] MOE_HOST_DEVICE(Index e, Index t) { return p[t * E + e]; },
        [=] MOE_HOST_DEVICE(Index e, S column) { aux_term[e] = aux_grad[e] * column; }, T * E);
    double load_balance = 0;
    for (Index e = 0; e < E; ++e) load_balance += static_cast<double>(aux_term[e]);
    sel.load_balance_loss = group.sum(load_balance);
    if (z_coef > 0) {
      const S* lse = cache.lse.data();
      double zl = 0;
      for (Index t = 0; t < T; ++t) zl += static_cast<double>(lse[t]) * static_cast<double>(lse[t]);
      sel.z_loss = z_coef * group.sum(zl) / T_all;
    }
    sel.aux_loss = sel.load_balance_loss + sel.z_loss;
  }

  // dL/dG (every entry) -> dL/dz (T, E), the aux and z-loss gradients included.
  template <class B>
  static void backward(const B& be, const Selection<typename B::Scalar, B::template Buffer>& sel,
                       const Cache<B>& cache, const typename B::Scalar* dgates,
                       typename B::Scalar* dlogits) {
    using S = typename B::Scalar;
    const Index T = sel.tokens, E = sel.experts;
    const int kk = cache.k, EE = static_cast<int>(E);
    const S* p = sel.probabilities.data();
    const S* g = sel.gates.data();
    const S* lse = cache.lse.data();
    const S* aux_grad = cache.aux_grad.data();
    const int* chosen = sel.pair_expert.data();
    const auto norm = cache.normalization;
    const S zc_scale = static_cast<S>(2.0 * cache.z_coef / static_cast<double>(cache.batch_tokens));
    be.parallel_for(
        T,
        [=] MOE_HOST_DEVICE(Index t) {
          math::topk_gates_backward(p + t * E, g + t * E, chosen + t * kk, EE, kk, norm,
                                    dgates + t * E, aux_grad, zc_scale * lse[t], dlogits + t * E);
        },
        T * E * 8);
  }
};

}  // namespace moe::router
