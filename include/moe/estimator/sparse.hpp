#pragma once
// The standard sparse estimator (docs/algorithms.md section 4):
//   y_t = sum_{i in A_t} G_ti E_i(x_t),  dL/dG_ti = <g_t, E_i(x_t)> for i in A_t only.
// Experts outside A_t contribute nothing to the forward and receive no gate
// gradient and there is no state, so every hook is empty by definition.

#include "moe/core/concepts.hpp"

namespace moe::estimator {

struct Sparse {
  static constexpr const char* kName = "sparse";
  static constexpr bool kComputesAllExperts = false;

  void validate(const LayerConfig&) const {}
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

static_assert(EstimatorPolicy<Sparse, archetype::Backend>);

}  // namespace moe::estimator
