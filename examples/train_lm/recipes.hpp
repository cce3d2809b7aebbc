#pragma once
// The recipes moe-train-lm compares, each a stack of moe::Layer blocks with
// the same shape, seed and (nominal) active compute:
//   dense         one expert of width k * d_ff (an FFN of the same active size)
//   topk          TopK k of E, Switch aux loss (Fedus et al. 2021)
//   default-moe   TopK + DefaultEMA default outputs (Panda et al. 2025)
//   remoe         ReLU router + adaptive L1, target 1 - k/E (Wang et al. 2025)
//   acmoe         TopK first, AdaptiveCluster after (Nielsen et al. 2025)
//   smoe-dropout  frozen random router, k from --smoe-k-min to E (Chen et al. 2023)
//   smoe-learned  the same router form and k curriculum, learned (with the aux
//                 loss): SMoE-Dropout's learned-router baseline; not in "all"
// Experts are GELU FFNs with biases in every recipe, so that only the routing
// and the gradient estimator differ.

#include <memory>
#include <moe/moe.hpp>
#include <moe/recipes.hpp>
#include <string>
#include <vector>

#include "blocks.hpp"

namespace train_lm {

inline const std::vector<std::string>& recipe_names() {
  static const std::vector<std::string> names{"dense", "topk",  "default-moe",
                                              "remoe", "acmoe", "smoe-dropout"};
  return names;
}

// Recipes named only explicitly (--recipes), for the reproductions.
inline const std::vector<std::string>& extra_recipe_names() {
  static const std::vector<std::string> names{"smoe-learned"};
  return names;
}

// Recipes whose k can be set for inference (self-slimming sweeps).
inline bool has_inference_k(const std::string& recipe) { return recipe.starts_with("smoe-"); }

struct RecipeOptions {
  int d_model = 128;
  int d_ff = 128;  // per expert
  int experts = 8;
  int k = 2;
  int layers = 2;
  double aux_coef = 0.01;
  double ema_beta = 0.9;
  int smoe_k_min = 2;
  std::uint64_t total_steps = 1;  // the SMoE-Dropout curriculum's length
};

// Blocks of one recipe; `controller` receives ReMoE's shared lambda
// controller. The MoE blocks' experts are placed by `dispatcher`
// (dispatch::Local: all here; mpi::ExpertParallel: over the processes); the
// dense recipe's one expert is always held whole.
template <class T, class Dispatcher = moe::dispatch::Local>
std::vector<std::unique_ptr<Block<T>>> make_blocks(
    const std::string& recipe, const RecipeOptions& o, std::uint64_t seed,
    std::shared_ptr<moe::router::LambdaController>* controller = nullptr,
    const Dispatcher& dispatcher = {}) {
  using Backend = moe::cpu::Backend<T>;
  using Act = moe::act::GELU;
  const moe::LayerConfig moe_config{
      .d_model = o.d_model, .d_ff = o.d_ff, .experts = o.experts, .expert_bias = true};
  const moe::router::TopK topk{.k = o.k, .aux_coef = o.aux_coef};
  std::vector<std::unique_ptr<Block<T>>> blocks;
  std::shared_ptr<moe::router::LambdaController> shared;
  if (recipe == "remoe")
    shared = std::make_shared<moe::router::LambdaController>(
        moe::router::LambdaController::for_experts(o.k, o.experts));
  for (int l = 0; l < o.layers; ++l) {
    const std::uint64_t layer_seed = moe::math::hash3(seed, 0x6c61796572ull, l);  // "layer"
    if (recipe == "dense") {
      const moe::LayerConfig dense{
          .d_model = o.d_model, .d_ff = o.k * o.d_ff, .experts = 1, .expert_bias = true};
      blocks.push_back(
          make_block(moe::Layer<moe::router::TopK, moe::estimator::Sparse, Backend, Act>(
              dense, moe::router::TopK{.k = 1, .aux_coef = 0}, {}, layer_seed)));
    } else if (recipe == "topk" || (recipe == "acmoe" && l == 0)) {
      blocks.push_back(make_block(
          moe::Layer<moe::router::TopK, moe::estimator::Sparse, Backend, Act, Dispatcher>(
              moe_config, topk, {}, layer_seed, Backend{}, dispatcher)));
    } else if (recipe == "default-moe") {
      blocks.push_back(make_block(moe::DefaultMoELayer<Backend, Act, Dispatcher>(
          moe_config, topk, moe::estimator::DefaultEMA{.beta = o.ema_beta}, layer_seed, Backend{},
          dispatcher)));
    } else if (recipe == "remoe") {
      blocks.push_back(make_block(moe::ReMoELayer<Backend, Act, Dispatcher>(
          moe_config, moe::router::ReluL1{.controller = shared, .k = o.k}, {}, layer_seed,
          Backend{}, dispatcher)));
    } else if (recipe == "acmoe") {
      blocks.push_back(make_block(moe::ACMoELayer<Backend, Act, Dispatcher>(
          moe_config, moe::router::AdaptiveCluster{.k = o.k}, {}, layer_seed, Backend{},
          dispatcher)));
    } else if (recipe == "smoe-dropout") {
      const moe::router::schedule::Linear curriculum{
          .k_min = o.smoe_k_min, .k_max = o.experts, .total_steps = o.total_steps};
      blocks.push_back(
          make_block(moe::SMoEDropoutLayer<Backend, Act, moe::router::schedule::Linear, Dispatcher>(
              moe_config, moe::router::random_frozen(curriculum), {}, layer_seed, Backend{},
              dispatcher)));
    } else if (recipe == "smoe-learned") {
      // SMoE-Dropout's router form, learned, with the load-balancing loss a
      // learned router needs.
      moe::router::TopK learned = moe::router::random_frozen_topk(o.smoe_k_min);
      learned.frozen = false;
      learned.aux_coef = o.aux_coef;
      const moe::router::schedule::Linear curriculum{
          .k_min = o.smoe_k_min, .k_max = o.experts, .total_steps = o.total_steps};
      using Router = moe::router::Scheduled<moe::router::TopK, moe::router::schedule::Linear>;
      blocks.push_back(
          make_block(moe::Layer<Router, moe::estimator::Sparse, Backend, Act, Dispatcher>(
              moe_config, Router(learned, curriculum), {}, layer_seed, Backend{}, dispatcher)));
    } else {
      std::string known;
      for (const auto& n : recipe_names()) known += (known.empty() ? "" : ", ") + n;
      for (const auto& n : extra_recipe_names()) known += ", " + n;
      throw moe::Error(moe::detail::concat("moe-train-lm: --recipes: unknown recipe '", recipe,
                                           "', expected one of: ", known, ", all"));
    }
  }
  if (controller != nullptr) *controller = shared;
  return blocks;
}

}  // namespace train_lm
