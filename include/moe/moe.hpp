#pragma once
// moe: header-only Mixture-of-Experts layers with hand-written backward passes.
// This umbrella header brings in the layer, every policy and the CPU backend.

#include "moe/activation/activations.hpp"
#include "moe/backend/cpu/backend.hpp"
#include "moe/core/concepts.hpp"
#include "moe/core/config.hpp"
#include "moe/core/context.hpp"
#include "moe/core/error.hpp"
#include "moe/core/routing.hpp"
#include "moe/core/tensor_buffer.hpp"
#include "moe/core/view.hpp"
#include "moe/estimator/default_ema.hpp"
#include "moe/estimator/dense_exact.hpp"
#include "moe/estimator/sparse.hpp"
#include "moe/layer.hpp"
#include "moe/optim/adamw.hpp"
#include "moe/optim/sgd.hpp"
#include "moe/recipes.hpp"
#include "moe/router/adaptive_cluster.hpp"
#include "moe/router/k_schedule.hpp"
#include "moe/router/lambda_controller.hpp"
#include "moe/router/relu_l1.hpp"
#include "moe/router/scheduled.hpp"
#include "moe/router/topk.hpp"

namespace moe {

static_assert(RouterPolicy<router::TopK, cpu::Backend<float>>);
static_assert(EstimatorPolicy<estimator::Sparse, cpu::Backend<double>>);

}  // namespace moe
