// Must NOT compile: a router with run state whose end_step hook is misspelt
// (end_stpe). Router hooks are part of RouterPolicy, not found by a
// requires-expression and skipped when absent, so the misspelling is a
// compile error naming the concept. With MOE_COMPILE_FAIL_CONTROL the hook is
// spelt right and the same code must compile.
#include <cstdint>
#include <utility>

#include "moe/moe.hpp"

// TopK that counts optimiser steps in the layer's state.
struct StepCountingRouter {
  moe::router::TopK topk;
  std::uint64_t steps = 0;

  static constexpr const char* kName = "step_counting";
  template <class B>
  using Cache = moe::router::TopK::Cache<B>;

  moe::Index nominal_k() const { return topk.nominal_k(); }
  void validate(const moe::LayerConfig& config) const { topk.validate(config); }
  void check_context(const moe::ForwardContext& context, moe::Index tokens,
                     const moe::LayerConfig& config) const {
    topk.check_context(context, tokens, config);
  }
  void add_parameters(moe::TensorLayout& layout, const moe::LayerConfig& config) const {
    topk.add_parameters(layout, config);
  }
  template <class S>
  void init(moe::TensorBuffer<S>& params, const moe::LayerConfig& config,
            std::uint64_t seed) const {
    topk.init(params, config, seed);
  }
  template <class B, class... Args>
  void forward(const B& backend, Args&&... args) const {
    topk.forward(backend, std::forward<Args>(args)...);
  }
  template <class B, class... Args>
  void backward(const B& backend, Args&&... args) const {
    topk.backward(backend, std::forward<Args>(args)...);
  }
  void add_state(moe::TensorLayout& layout, const moe::LayerConfig&) const {
    layout.add("router.steps", {1});
  }
  void save_state(moe::TensorBuffer<double>& state) const {
    state["router.steps"][0] = static_cast<double>(steps);
  }
  void restore(const moe::TensorBuffer<double>& state) {
    steps = static_cast<std::uint64_t>(state["router.steps"][0]);
  }
#ifdef MOE_COMPILE_FAIL_CONTROL
  void end_step(std::uint64_t done) { steps = done; }
#else
  void end_stpe(std::uint64_t done) { steps = done; }  // the misspelt hook
#endif
};

using L = moe::Layer<StepCountingRouter, moe::estimator::Sparse, moe::cpu::Backend<float>,
                     moe::act::GELU>;
static_assert(sizeof(L) > 0);

int main() { return 0; }
