#pragma once
// The adaptive L1 coefficient of ReMoE (Wang et al., "ReMoE: Fully
// Differentiable Mixture-of-Experts with ReLU Routing", ICLR 2025; docs/algorithms.md
// 3.2): one lambda shared by every ReLU-routed layer of a model. After each
// optimiser step, with S the fraction of zero gates over that step's training
// forwards (averaged over layers and forwards) and the target S* = 1 - k/E:
//   lambda *= factor if S < S*, else lambda /= factor   (factor 1.2),
// clamped to [kMinLambda, kMaxLambda] = [1e-30, 1e30] [choice; the paper has
// no clamp]. Sparsity stuck on one side of the target would otherwise take
// lambda to Inf (~4000 steps up from 1e-8), which no checkpoint can hold, or
// to 0, from which no factor brings it back. The bounds are far outside any
// useful value (training starts at 1e-8; 1e-30 climbs back to it in ~280
// steps), and the L1 scale lambda E / (k T^2) stays within float's range
// (3.4e38) for E below 3e8.

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "moe/core/error.hpp"

namespace moe::router {

class LambdaController {
 public:
  struct Options {
    double target_sparsity = 0.75;  // S* = 1 - k/E
    double initial_lambda = 1e-8;
    double factor = 1.2;
  };

  static constexpr double kMinLambda = 1e-30;
  static constexpr double kMaxLambda = 1e30;

  explicit LambdaController(Options options) : options_(options), lambda_(options.initial_lambda) {
    detail::require(options.target_sparsity >= 0 && options.target_sparsity < 1,
                    "moe::router::LambdaController: target_sparsity=", options.target_sparsity,
                    ", expected 0 <= target_sparsity < 1 (1 - k/E)");
    detail::require(in_range(options.initial_lambda),
                    "moe::router::LambdaController: initial_lambda=", options.initial_lambda,
                    ", expected a finite value > 0 in [", kMinLambda, ", ", kMaxLambda, "]");
    detail::require(std::isfinite(options.factor) && options.factor > 1,
                    "moe::router::LambdaController: factor=", options.factor,
                    ", expected a finite value > 1");
  }

  // The controller for k active experts out of E: S* = 1 - k/E.
  static LambdaController for_experts(int k, int experts, double initial_lambda = 1e-8) {
    detail::require(k >= 1 && k <= experts, "moe::router::LambdaController: k=", k,
                    ", expected 1 <= k <= experts=", experts);
    return LambdaController(
        {.target_sparsity = 1.0 - static_cast<double>(k) / static_cast<double>(experts),
         .initial_lambda = initial_lambda});
  }

  double lambda() const { return lambda_; }
  double target_sparsity() const { return options_.target_sparsity; }
  // Mean sparsity recorded since the last step (0 when none).
  double pending_sparsity() const { return forwards_ > 0 ? sparsity_sum_ / forwards_ : 0.0; }

  // One training forward of one layer.
  void record(double sparsity) {
    sparsity_sum_ += sparsity;
    forwards_ += 1;
  }

  // The update after optimiser step `step`. Every layer calls it; only the
  // first call for a step acts, so layers need not coordinate. A step without
  // training forwards leaves lambda alone.
  void end_step(std::uint64_t step) {
    if (has_stepped_ && step == last_step_) return;
    has_stepped_ = true;
    last_step_ = step;
    if (forwards_ > 0) {
      const bool too_dense = sparsity_sum_ / forwards_ < options_.target_sparsity;
      const double next = too_dense ? lambda_ * options_.factor : lambda_ / options_.factor;
      lambda_ = std::clamp(next, kMinLambda, kMaxLambda);  // Inf and 0 included
    }
    sparsity_sum_ = 0;
    forwards_ = 0;
  }

  // Restoring a checkpoint taken between steps (the layers' state carries
  // lambda): sparsity recorded since, and the marker of the last step, are
  // dropped, so replaying a step updates lambda again. Takes exactly the
  // values end_step can reach: [kMinLambda, kMaxLambda].
  void set_lambda(double lambda) {
    detail::require(in_range(lambda), "moe::router::LambdaController: lambda=", lambda,
                    ", expected a finite value > 0 in [", kMinLambda, ", ", kMaxLambda, "]");
    lambda_ = lambda;
    sparsity_sum_ = 0;
    forwards_ = 0;
    has_stepped_ = false;
  }

 private:
  static bool in_range(double lambda) { return lambda >= kMinLambda && lambda <= kMaxLambda; }

  Options options_;
  double lambda_;
  double sparsity_sum_ = 0;
  double forwards_ = 0;
  bool has_stepped_ = false;
  std::uint64_t last_step_ = 0;
};

}  // namespace moe::router
