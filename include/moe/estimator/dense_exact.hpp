#pragma once
// DenseExact, the reference oracle (docs/algorithms.md section 4): the forward value
// is Sparse's, but the layer computes every expert on every token, so the
// backward supplies dL/dG_ti = <g_t, E_i(x_t)> for every i. Costs E/k times
// Sparse; used to measure how close an estimator's router gradient is to the
// gradient of the dense mixture.

#include "moe/core/concepts.hpp"
#include "moe/core/error.hpp"

namespace moe::estimator {

struct DenseExact {
  static constexpr const char* kName = "dense_exact";
  static constexpr bool kComputesAllExperts = true;  // the layer does the work

  void validate(const LayerConfig& cfg) const {
    detail::require(cfg.capacity_factor == 0,
                    "moe::estimator::DenseExact: capacity_factor=", cfg.capacity_factor,
                    ", expected 0 (the oracle computes every pair)");
  }
  void add_state(TensorLayout&, const LayerConfig&) const {}

  template <class B>
  struct Cache {};  // nothing to read beyond the layer's cache

  template <class B>
  void update_state(const B&, Mode, const EstimatorBatch<typename B::Scalar>&,
                    TensorBuffer<double>&, Cache<B>&) const {}

  template <class B>
  void add_unselected_outputs(const B&, const EstimatorBatch<typename B::Scalar>&,
                              const TensorBuffer<double>&, Cache<B>&, typename B::Scalar*) const {}

  template <class B>
  void add_unselected_gate_gradients(const B&, const EstimatorBatch<typename B::Scalar>&,
                                     const TensorBuffer<double>&, Cache<B>&,
                                     const typename B::Scalar*, typename B::Scalar*) const {}
};

static_assert(EstimatorPolicy<DenseExact, archetype::Backend>);

}  // namespace moe::estimator
