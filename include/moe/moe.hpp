#pragma once
// moe: header-only Mixture-of-Experts layers with hand-written backward passes.
// This umbrella header brings in the layer, every policy and the CPU backend.

#include "moe/backend/cpu/backend.hpp"
#include "moe/common.hpp"

namespace moe {

static_assert(RouterPolicy<router::TopK, cpu::Backend<float>>);
static_assert(EstimatorPolicy<estimator::Sparse, cpu::Backend<double>>);

}  // namespace moe
