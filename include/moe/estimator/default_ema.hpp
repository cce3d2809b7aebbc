#pragma once
// Default MoE (Panda et al., "Dense Backpropagation Improves Training for
// Sparse Mixture-of-Experts", NeurIPS 2025; docs/algorithms.md section 4).
// Each expert keeps a default output Ehat_i (buffer "estimator.ema" (E, d),
// zero init, no gradient). In a training forward, before use:
//   Ehat_i <- beta Ehat_i + (1 - beta) m_i,   m_i = mean_{t in S_i} E_i(x_t)
// (score_weighted: m_i = sum p_ti E_i(x_t) / sum p_ti, with p the router's
// softmax over all E, or its gates where it has none, as ReLU routing),
// skipped when S_i is empty; no update in eval. A pair dropped by a capacity
// limit is in A_t, so it gets neither an output nor Ehat_i. The forward and
// the router gradient become dense:
//   y_t += sum_{i not in A_t} G~_ti Ehat_i,  dL/dG~_ti = <g_t, Ehat_i> for i not in A_t,
// where G~ are the router's dense gates off A_t: p for TopK's plain softmax
// and for its renormalised gates (renormalisation rescales only the
// selected ones). With ReLU gates or a softmax over the selected there is no
// G~ (it is 0), and DefaultEMA adds nothing to the output or the gradient.

#include <cmath>

#include "moe/core/concepts.hpp"
#include "moe/core/error.hpp"
#include "moe/math/ema.hpp"

namespace moe::estimator {

struct DefaultEMA {
  enum class Weighting { mean, score_weighted };

  // The paper's defaults by configuration: 8c1 / 8c2 0.9, 32c1 0.65,
  // 32c2 0.95, 32c4 0.999 ("Ec k": E experts, k active).
  double beta = 0.9;
  Weighting weighting = Weighting::mean;

  static constexpr const char* kName = "default_ema";
  static constexpr bool kComputesAllExperts = false;

  void validate(const LayerConfig&) const {
    detail::require(std::isfinite(beta) && beta >= 0 && beta < 1,
                    "moe::estimator::DefaultEMA: beta=", beta, ", expected 0 <= beta < 1");
  }

  void add_state(TensorLayout& layout, const LayerConfig& cfg) const {
    layout.add("estimator.ema", {cfg.experts, cfg.d_model});
  }

  // What a forward leaves to read: m_i, this batch's mean output of expert i
  // (the EMA's input in a training forward; computed in eval too), whether
  // the EMA took it (a training forward, i had tokens, and m_i was finite),
  // and whether it was refused for a NaN or Inf.
  template <class B>
  struct Cache {
    typename B::template Buffer<double> batch_mean;  // (E, d); rows of experts without tokens: 0
    typename B::template Buffer<int> updated;        // (E) 1 where Ehat_i moved, else 0
    typename B::template Buffer<int> non_finite;     // (E) 1 where m_i had a NaN or Inf
    typename B::template Buffer<double> totals;      // (E) sum of m_i's weights (scratch)
    // Scratch of the dense terms: Ehat in the layer's scalar (E, d), and G~
    // off A_t (0 on it) in the forward, dL/dG~ in the backward (T, E).
    typename B::template Buffer<typename B::Scalar> defaults, unselected;
  };

  // The EMA step of a training forward: m_i per expert over its rows in row
  // (token) order, then Ehat_i <- beta Ehat_i + (1 - beta) m_i for the
  // experts with tokens whose m_i is finite. An expert whose outputs hold a
  // NaN or Inf keeps its Ehat_i (and is flagged in cache.non_finite): one bad
  // batch never poisons the state for the forwards after it.
  template <class B>
  void update_state(const B& be, Mode mode, const EstimatorBatch<typename B::Scalar>& batch,
                    TensorBuffer<double>& state, Cache<B>& cache) const {
    const Index d = batch.d_model, E = batch.experts;
    cache.batch_mean.resize(static_cast<std::size_t>(E * d));
    cache.updated.resize(static_cast<std::size_t>(E));
    cache.non_finite.resize(static_cast<std::size_t>(E));
    int* updated = cache.updated.data();
    int* non_finite = cache.non_finite.data();
    batch_means(be, batch, cache);  // in eval too: readable, not taken
    // The flags in eval too; only a training forward moves the EMA.
    const bool train = mode == Mode::train;
    const double* mean = cache.batch_mean.data();
    be.parallel_sum_rows(
        E, d,
        [=] MOE_HOST_DEVICE(Index e, Index j) { return math::is_finite(mean[e * d + j]) ? 0 : 1; },
        [=] MOE_HOST_DEVICE(Index e, int bad) {
          non_finite[e] = updated[e] && bad > 0 ? 1 : 0;
          updated[e] = train && updated[e] && bad == 0 ? 1 : 0;
        },
        E * d);
    if (!train) return;
    double* ema = state["estimator.ema"].data();
    const double b = beta;
    be.parallel_for_rows(
        E, d,
        [=] MOE_HOST_DEVICE(Index e, Index begin, Index end) {
          if (!updated[e]) return;
          for (Index j = begin; j < end; ++j)
            ema[e * d + j] = math::ema_update(ema[e * d + j], b, mean[e * d + j]);
        },
        E * d);
  }

  // cache.batch_mean = m_i (0 for an expert without tokens) and
  // cache.updated = whether S_i is non-empty, over the whole batch: the
  // weighted sums and totals of this process's rows, summed over the group
  // (one process: its own), then divided.
  template <class B>
  void batch_means(const B& be, const EstimatorBatch<typename B::Scalar>& batch,
                   Cache<B>& cache) const {
    const Index d = batch.d_model, E = batch.experts;
    cache.totals.resize(static_cast<std::size_t>(E));
    double* mean = cache.batch_mean.data();
    double* totals = cache.totals.data();
    int* updated = cache.updated.data();
    const auto* out = batch.expert_out;
    // The score of each row's token for its expert: p, or the gates where
    // the router has no probabilities.
    const auto* scores = batch.probabilities != nullptr ? batch.probabilities : batch.gates;
    const Index* offsets = batch.expert_offsets;
    const Index* row_token = batch.row_token;
    const bool weighted = weighting == Weighting::score_weighted;
    be.parallel_for(
        E,
        [=] MOE_HOST_DEVICE(Index e) {
          double total = 0;
          for (Index r = offsets[e]; r < offsets[e + 1]; ++r)
            total += weighted ? static_cast<double>(scores[row_token[r] * E + e]) : 1.0;
          totals[e] = total;
        },
        batch.rows);
    // Each column's sum in row order, the rows walked once (contiguous reads).
    be.parallel_for_rows(
        E, d,
        [=] MOE_HOST_DEVICE(Index e, Index begin, Index end) {
          double* sum = mean + e * d;
          for (Index j = begin; j < end; ++j) sum[j] = 0;
          for (Index r = offsets[e]; r < offsets[e + 1]; ++r) {
            const double w = weighted ? static_cast<double>(scores[row_token[r] * E + e]) : 1.0;
            for (Index j = begin; j < end; ++j) sum[j] += w * static_cast<double>(out[r * d + j]);
          }
        },
        batch.rows * d);
    batch.group->sum(totals, E);
    batch.group->sum(mean, E * d);
    be.parallel_for_rows(
        E, d,
        [=] MOE_HOST_DEVICE(Index e, Index begin, Index end) {
          const bool update = totals[e] > 0;  // S_i empty: keep Ehat_i [choice]
          if (begin == 0) updated[e] = update ? 1 : 0;
          for (Index j = begin; j < end; ++j)
            mean[e * d + j] = update ? mean[e * d + j] / totals[e] : 0;
        },
        E * d);
  }

  // y_t += sum_{i not in A_t} G~_ti Ehat_i: one (T, E) x (E, d) product
  // with G~ zeroed on A_t.
  template <class B>
  void add_unselected_outputs(const B& be, const EstimatorBatch<typename B::Scalar>& batch,
                              const TensorBuffer<double>& state, Cache<B>& cache,
                              typename B::Scalar* y) const {
    using S = typename B::Scalar;
    const Index T = batch.tokens, d = batch.d_model, E = batch.experts;
    const S* defaults = defaults_in_scalar(be, state, E, d, cache);
    cache.unselected.resize(static_cast<std::size_t>(T * E));
    S* unselected = cache.unselected.data();
    const S* gates = batch.gates;
    const Index* offsets = batch.token_offsets;
    const int* pair_expert = batch.pair_expert;
    be.parallel_for_rows(
        T, E,
        [=] MOE_HOST_DEVICE(Index t, Index begin, Index end) {
          for (Index e = begin; e < end; ++e)
            unselected[t * E + e] = selected(offsets, pair_expert, t, e) ? S(0) : gates[t * E + e];
        },
        T * E);
    be.gemm_rows(false, T, d, E, S(1), unselected, E, defaults, d, S(1), y, d);
  }

  // dL/dG~_ti = <g_t, Ehat_i> for i not in A_t: one (T, d) x (d, E) product,
  // then the unselected entries copied out.
  template <class B>
  void add_unselected_gate_gradients(const B& be, const EstimatorBatch<typename B::Scalar>& batch,
                                     const TensorBuffer<double>& state, Cache<B>& cache,
                                     const typename B::Scalar* dy,
                                     typename B::Scalar* dgates) const {
    using S = typename B::Scalar;
    const Index T = batch.tokens, d = batch.d_model, E = batch.experts;
    const S* defaults = defaults_in_scalar(be, state, E, d, cache);
    cache.unselected.resize(static_cast<std::size_t>(T * E));
    S* dots = cache.unselected.data();
    be.gemm_rows(true, T, E, d, S(1), dy, d, defaults, d, S(0), dots, E);
    const Index* offsets = batch.token_offsets;
    const int* pair_expert = batch.pair_expert;
    be.parallel_for_rows(
        T, E,
        [=] MOE_HOST_DEVICE(Index t, Index begin, Index end) {
          for (Index e = begin; e < end; ++e)
            if (!selected(offsets, pair_expert, t, e)) dgates[t * E + e] = dots[t * E + e];
        },
        T * E);
  }

  // Ehat (E, d) of `state` in the layer's scalar, in cache.defaults. Public
  // only because nvcc's device lambdas cannot live in private members.
  template <class B>
  static const typename B::Scalar* defaults_in_scalar(const B& be,
                                                      const TensorBuffer<double>& state, Index E,
                                                      Index d, Cache<B>& cache) {
    using S = typename B::Scalar;
    cache.defaults.resize(static_cast<std::size_t>(E * d));
    S* defaults = cache.defaults.data();
    const double* ema = state["estimator.ema"].data();
    be.parallel_for_rows(
        E, d,
        [=] MOE_HOST_DEVICE(Index e, Index begin, Index end) {
          for (Index j = begin; j < end; ++j) defaults[e * d + j] = static_cast<S>(ema[e * d + j]);
        },
        E * d);
    return defaults;
  }

 private:
  MOE_HOST_DEVICE static bool selected(const Index* offsets, const int* pair_expert, Index t,
                                       Index e) {
    for (Index p = offsets[t]; p < offsets[t + 1]; ++p)
      if (pair_expert[p] == e) return true;
    return false;
  }
};

static_assert(EstimatorPolicy<DefaultEMA, archetype::Backend>);

}  // namespace moe::estimator
