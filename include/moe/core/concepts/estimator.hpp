#pragma once
#include <concepts>
#include <utility>

#include "moe/core/concepts/backend.hpp"
#include "moe/core/process_group.hpp"
#include "moe/core/tensor_buffer.hpp"

namespace moe {

// What an estimator sees of one batch (views in backend memory): the router's
// gates and selection A_t, and the outputs of the computed pairs in
// expert-sorted rows.
template <class S>
struct EstimatorBatch {
  Index tokens = 0, experts = 0, d_model = 0;
  const S* gates = nullptr;               // (T, E) the router's gates G_te (off A_t: G~_te)
  const S* probabilities = nullptr;       // (T, E) the router's p_te, or null (no softmax)
  const Index* token_offsets = nullptr;   // (T + 1) the router's selection A_t, as CSR
  const int* pair_expert = nullptr;       // (P)
  const Index* expert_offsets = nullptr;  // (E + 1) rows of expert e
  const Index* row_token = nullptr;       // (rows) the token of each computed row
  const S* expert_out = nullptr;          // (rows, d) E_e(x_t) of each computed row
  Index rows = 0;                         // expert_offsets[E], known on the host
  // The processes whose tokens make up the batch (see ProcessGroup): the
  // estimator's per-expert statistics are sums over all of them.
  const ProcessGroup* group = &single_process();
};

// A gradient estimator (docs/algorithms.md section 4). It decides
//  - whether the layer computes every expert on every token (DenseExact) or
//    only the selected pairs (kComputesAllExperts);
//  - what the forward adds for experts outside A_t, from state it keeps in the
//    layer's state buffer (add_state, update_state in training forwards);
//  - which entries of dL/dG the backward adds beyond the computed pairs (the
//    layer always supplies dL/dG_te = <g_t, E_e(x_t)> for computed pairs).
// Its per-batch Cache (in the layer's cache) holds what a researcher may
// read after a forward, e.g. DefaultEMA's batch means, and the estimator's
// scratch (every hook gets it: one layer serves several caches at once).
template <class Est, class B>
concept EstimatorPolicy = BackendPolicy<B> &&
    requires(const Est& est, const B& be, const LayerConfig& cfg, TensorLayout& layout, Mode mode,
             const EstimatorBatch<typename B::Scalar>& batch, TensorBuffer<double>& state,
             typename Est::template Cache<B>& cache, typename B::Scalar* y,
             const typename B::Scalar* dy, typename B::Scalar* dgates) {
  { Est::kName } -> std::convertible_to<const char*>;
  { Est::kComputesAllExperts } -> std::convertible_to<bool>;
  est.validate(cfg);
  est.add_state(layout, cfg);
  est.update_state(be, mode, batch, state, cache);
  est.add_unselected_outputs(be, batch, std::as_const(state), cache, y);
  est.add_unselected_gate_gradients(be, batch, std::as_const(state), cache, dy, dgates);
};

}  // namespace moe
