#pragma once
// One alias per paper: the policies of each recipe. Hyperparameters keep the
// papers' defaults in the policy objects (TopK: aux 0.01, small_init;
// DefaultEMA: beta 0.9; ReluL1: lambda from 1e-8, x/÷ 1.2, N(0, 0.01) init;
// AdaptiveCluster: top-2, softmax over selected, gain 0.32; RandomFrozen:
// N(0, 0.02) frozen, softmax over selected, k from 8 to 16 of E = 16).
//
//   moe::DefaultMoELayer<moe::cpu::Backend<float>> layer(
//       {.d_model = 512, .d_ff = 1024, .experts = 8}, moe::router::TopK{.k = 1},
//       moe::estimator::DefaultEMA{.beta = 0.9}, seed);
//
// The last parameter of each is the dispatcher (dispatch::Local: every expert
// in this process; moe::mpi::ExpertParallel: experts over processes).

#include "moe/activation/activations.hpp"
#include "moe/estimator/default_ema.hpp"
#include "moe/estimator/sparse.hpp"
#include "moe/layer.hpp"
#include "moe/router/adaptive_cluster.hpp"
#include "moe/router/relu_l1.hpp"
#include "moe/router/scheduled.hpp"
#include "moe/router/topk.hpp"

namespace moe {

// Default MoE (Panda et al., NeurIPS 2025): TopK without renormalisation, dense
// EMA default outputs, SwiGLU experts without biases.
template <class Backend, class Act = act::SwiGLU, class Dispatcher = dispatch::Local>
using DefaultMoELayer = Layer<router::TopK, estimator::DefaultEMA, Backend, Act, Dispatcher>;

// ReMoE (Wang et al., ICLR 2025): ReLU routing with the adaptive L1 term
// (share one LambdaController across the model's layers), SwiGLU experts.
template <class Backend, class Act = act::SwiGLU, class Dispatcher = dispatch::Local>
using ReMoELayer = Layer<router::ReluL1, estimator::Sparse, Backend, Act, Dispatcher>;

// ACMoE (Nielsen et al., ICLR 2025): adaptive-clustering router fed with the
// previous MoE layer's top-1 assignment; ReLU experts with biases
// (LayerConfig::expert_bias = true).
template <class Backend, class Act = act::ReLU, class Dispatcher = dispatch::Local>
using ACMoELayer = Layer<router::AdaptiveCluster, estimator::Sparse, Backend, Act, Dispatcher>;

// SMoE-Dropout (Chen et al., ICLR 2023): random frozen router, k curriculum,
// any k at inference; ReLU experts with biases and dropout 0.1
// (LayerConfig::expert_bias = true, .dropout = 0.1).
template <class Backend, class Act = act::ReLU, class Schedule = router::schedule::Linear,
          class Dispatcher = dispatch::Local>
using SMoEDropoutLayer =
    Layer<router::RandomFrozen<Schedule>, estimator::Sparse, Backend, Act, Dispatcher>;

}  // namespace moe
