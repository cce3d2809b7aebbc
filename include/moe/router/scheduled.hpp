#pragma once
// Scheduled<Router, Schedule>: any router with a runtime `k` whose k follows a
// curriculum during training (SMoE-Dropout's k from k_min to k_max) and can be
// set to any value for inference (self-slimming). The number of steps done is
// layer state ("router.step"), so a checkpoint restores k exactly.
//
// RandomFrozen (SMoE-Dropout, Chen et al., ICLR 2023; docs/algorithms.md 3.4) is the
// TopK preset: bias, W_r ~ N(0, 0.02^2), b_r = 0, both frozen (dL/dx still
// flows), top-k on logits, softmax over the selected k, no aux loss.

#include <cstdint>
#include <utility>

#include "moe/core/concepts.hpp"
#include "moe/core/error.hpp"
#include "moe/router/k_schedule.hpp"
#include "moe/router/topk.hpp"

namespace moe::router {

template <class Router, KSchedulePolicy Schedule>
class Scheduled {
 public:
  template <class B>
  using Cache = typename Router::template Cache<B>;
  static constexpr const char* kName = Router::kName;

  Scheduled(Router router, Schedule schedule)
      : router_(std::move(router)), schedule_(std::move(schedule)) {
    router_.k = schedule_.k_at(0);
  }

  Router& router() { return router_; }
  const Router& router() const { return router_; }
  const Schedule& schedule() const { return schedule_; }
  int k() const { return router_.k; }
  std::uint64_t steps_done() const { return steps_done_; }

  // Self-slimming: eval forwards use k (any value in 1..E, checked at the next
  // forward); training forwards always use the schedule's k. set_k(0) clears.
  void set_k(int k) { inference_k_ = k; }
  int inference_k() const { return inference_k_ > 0 ? inference_k_ : router_.k; }

  Index nominal_k() const { return router_.nominal_k(); }
  void validate(const LayerConfig& cfg) const {
    schedule_.validate(cfg.experts);
    router_.validate(cfg);
    detail::require(inference_k_ >= 0 && inference_k_ <= cfg.experts,
                    "moe::router::Scheduled: set_k(k=", inference_k_,
                    "), expected 1 <= k <= experts=", cfg.experts, " (or 0 to clear)");
  }
  void add_parameters(TensorLayout& layout, const LayerConfig& cfg) const {
    router_.add_parameters(layout, cfg);
  }
  void check_context(const ForwardContext& context, Index tokens, const LayerConfig& cfg) const {
    router_.check_context(context, tokens, cfg);
  }
  void add_state(TensorLayout& layout, const LayerConfig& cfg) const {
    router_.add_state(layout, cfg);
    layout.add("router.step", {1});
  }
  template <class S>
  void init(TensorBuffer<S>& params, const LayerConfig& cfg, std::uint64_t seed) const {
    router_.init(params, cfg, seed);
  }

  template <class B>
  void forward(const B& be, Mode mode, ConstMatrixView<typename B::Scalar> x,
               const TensorBuffer<typename B::Scalar>& params, const ForwardContext& context,
               Selection<typename B::Scalar, B::template Buffer>& sel, Cache<B>& cache) const {
    if (mode == Mode::eval && inference_k_ > 0) {
      Router slim = router_;
      slim.k = inference_k_;
      slim.forward(be, mode, x, params, context, sel, cache);
    } else {
      router_.forward(be, mode, x, params, context, sel, cache);
    }
  }

  template <class B>
  void backward(const B& be, ConstMatrixView<typename B::Scalar> x,
                const TensorBuffer<typename B::Scalar>& params,
                const Selection<typename B::Scalar, B::template Buffer>& sel, const Cache<B>& cache,
                const typename B::Scalar* dgates, typename B::Scalar* dx,
                TensorBuffer<typename B::Scalar>& grads, typename B::Scalar* dlogits) const {
    router_.backward(be, x, params, sel, cache, dgates, dx, grads, dlogits);
  }

  // After `steps` optimiser steps, the next training step uses k_at(steps).
  // Both take steps below 2^53 only: the state keeps the count in a double,
  // and restore() would refuse a larger one. Checked before anything changes.
  void end_step(std::uint64_t steps) {
    check_step(steps, "end_step");
    router_.end_step(steps);
    set_step(steps);
  }
  // Resume the curriculum at `steps` steps done, without an optimiser step
  // (Layer::set_schedule_step also records it in the layer's state).
  void set_step(std::uint64_t steps) {
    check_step(steps, "set_step");
    steps_done_ = steps;
    router_.k = schedule_.k_at(steps);
  }
  void save_state(TensorBuffer<double>& state) const {
    router_.save_state(state);
    state["router.step"][0] = static_cast<double>(steps_done_);
  }
  // Checks before changing anything, so a failed load_state changes nothing.
  void restore(const TensorBuffer<double>& state) {
    detail::require_whole(state["router.step"][0], 53, "moe::router::Scheduled::restore",
                          "router.step");
    router_.restore(state);
    steps_done_ = static_cast<std::uint64_t>(state["router.step"][0]);
    router_.k = schedule_.k_at(steps_done_);
  }

 private:
  static void check_step(std::uint64_t steps, const char* where) {
    detail::require(steps < (std::uint64_t{1} << 53), "moe::router::Scheduled::", where,
                    ": steps=", steps, ", expected < 2^53 (the state keeps it in a double)");
  }

  Router router_;
  Schedule schedule_;
  std::uint64_t steps_done_ = 0;
  int inference_k_ = 0;  // 0: eval uses the schedule's k too
};

// SMoE-Dropout's frozen random router with k fixed at k.
inline TopK random_frozen_topk(int k) {
  return TopK{.k = k,
              .softmax_over_selected = true,
              .bias = true,
              .frozen = true,
              .aux_coef = 0.0,
              .z_coef = 0.0,
              .init_std = 0.02};
}

template <KSchedulePolicy Schedule = schedule::Linear>
using RandomFrozen = Scheduled<TopK, Schedule>;

// The SMoE-Dropout router with a k curriculum (paper scripts: E = 16, k from 8 to 16).
template <KSchedulePolicy Schedule>
RandomFrozen<Schedule> random_frozen(Schedule schedule) {
  return RandomFrozen<Schedule>(random_frozen_topk(schedule.k_at(0)), std::move(schedule));
}

static_assert(RouterPolicy<RandomFrozen<>, archetype::Backend>);

}  // namespace moe::router
