#pragma once
#include <concepts>

#include "moe/core/concepts/backend.hpp"

namespace moe {

// What an estimator sees of one batch: the router's selection, the dispatch
// and the expert outputs in expert-sorted rows (views in backend memory).
template <class S>
struct EstimatorBatch {
  Index tokens = 0, experts = 0, d_model = 0;
  const S* gates = nullptr;              // (T, E)
  const Index* token_offsets = nullptr;  // (T + 1)
  const int* pair_expert = nullptr;      // (P)
  const Index* pair_row = nullptr;       // (P), -1 when dropped
  const S* expert_out = nullptr;         // (rows, d)
};

// A gradient estimator (ALGORITHMS.md section 4): decides what the forward adds
// for experts outside the selection and which entries of dL/dG the backward
// supplies beyond the computed pairs. The layer always supplies
// dL/dG_te = <g_t, E_e(x_t)> for every computed pair.
template <class Est, class B>
concept EstimatorPolicy = BackendPolicy<B> &&
    requires(const Est& est, const B& be, const LayerConfig& cfg, Mode mode,
             const EstimatorBatch<typename B::Scalar>& batch, typename B::Scalar* y,
             const typename B::Scalar* dy, typename B::Scalar* dgates) {
  { Est::kName } -> std::convertible_to<const char*>;
  est.validate(cfg);
  est.add_unselected_outputs(be, mode, batch, y);
  est.add_unselected_gate_gradients(be, batch, dy, dgates);
};

}  // namespace moe
