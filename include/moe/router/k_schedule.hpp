#pragma once
// k curricula for top-k routers (SMoE-Dropout, Chen et al., "Sparse MoE as the
// New Dropout", ICLR 2023; docs/algorithms.md 3.4). A schedule maps the number of
// optimiser steps done, t, to the k of the next training step; every schedule
// starts at k_min (t = 0) and reaches k_max at t = total_steps.

#include <cmath>
#include <concepts>
#include <cstdint>

#include "moe/core/config.hpp"
#include "moe/core/error.hpp"

namespace moe::router {

// A k schedule: k_at(t) in [1, E] for every t; validate(E) rejects bad options.
template <class S>
concept KSchedulePolicy = requires(const S& s, std::uint64_t t, Index experts) {
  { S::kName } -> std::convertible_to<const char*>;
  { s.k_at(t) } -> std::convertible_to<int>;
  s.validate(experts);
};

namespace schedule {

namespace detail {
inline void check_range(const char* name, int k_min, int k_max, std::uint64_t total,
                        Index experts) {
  moe::detail::require(k_min >= 1 && k_min <= k_max && k_max <= experts,
                       "moe::router::schedule::", name, ": (k_min, k_max)=(", k_min, ", ", k_max,
                       "), expected 1 <= k_min <= k_max <= experts=", experts);
  moe::detail::require(total >= 1, "moe::router::schedule::", name, ": total_steps=", total,
                       ", expected >= 1");
}
// Round half to even, as Python's round() in the paper's scripts.
inline int round_half_even(double v) {
  const double floor_v = std::floor(v);
  const double frac = v - floor_v;
  auto n = static_cast<long long>(floor_v);
  if (frac > 0.5 || (frac == 0.5 && n % 2 != 0)) ++n;
  return static_cast<int>(n);
}
inline int clip(int k, int lo, int hi) { return k < lo ? lo : (k > hi ? hi : k); }
inline double progress(std::uint64_t t, std::uint64_t total) {
  return t >= total ? 1.0 : static_cast<double>(t) / static_cast<double>(total);
}
}  // namespace detail

// A fixed k (inference at any k: self-slimming).
struct Constant {
  int k = 2;
  static constexpr const char* kName = "Constant";
  int k_at(std::uint64_t) const { return k; }
  void validate(Index experts) const { detail::check_range(kName, k, k, 1, experts); }
};

// The paper's curriculum (docs/algorithms.md 3.4):
//   k(t) = clip(round_half_even((k_max - k_min) t / T) + k_min, k_min, k_max).
// The quotient is rounded exactly, in integers, so the .5 cases are exact.
struct Linear {
  int k_min = 8, k_max = 16;
  std::uint64_t total_steps = 0;  // required: the curriculum's length
  static constexpr const char* kName = "Linear";
  int k_at(std::uint64_t t) const {
    const std::uint64_t span = static_cast<std::uint64_t>(k_max - k_min);
    const std::uint64_t capped = t > total_steps ? total_steps : t;  // clip: k_max after T
    const std::uint64_t num = span * capped;
    std::uint64_t q = num / total_steps;
    const std::uint64_t twice_rem = 2 * (num % total_steps);
    if (twice_rem > total_steps || (twice_rem == total_steps && q % 2 == 1)) ++q;
    return detail::clip(static_cast<int>(q) + k_min, k_min, k_max);
  }
  void validate(Index experts) const {
    detail::check_range(kName, k_min, k_max, total_steps, experts);
  }
};

// k_min + (k_max - k_min) (1 - cos(pi t / T)) / 2, rounded half to even.
struct Cosine {
  int k_min = 8, k_max = 16;
  std::uint64_t total_steps = 0;  // required: the curriculum's length
  static constexpr const char* kName = "Cosine";
  int k_at(std::uint64_t t) const {
    const double p = detail::progress(t, total_steps);
    const double k = k_min + (k_max - k_min) * 0.5 * (1.0 - std::cos(3.14159265358979323846 * p));
    return detail::clip(detail::round_half_even(k), k_min, k_max);
  }
  void validate(Index experts) const {
    detail::check_range(kName, k_min, k_max, total_steps, experts);
  }
};

// k_min (k_max / k_min)^(t / T), rounded half to even: slow start, fast end.
struct Exponential {
  int k_min = 8, k_max = 16;
  std::uint64_t total_steps = 0;  // required: the curriculum's length
  static constexpr const char* kName = "Exponential";
  int k_at(std::uint64_t t) const {
    const double p = detail::progress(t, total_steps);
    const double k = k_min * std::pow(static_cast<double>(k_max) / k_min, p);
    return detail::clip(detail::round_half_even(k), k_min, k_max);
  }
  void validate(Index experts) const {
    detail::check_range(kName, k_min, k_max, total_steps, experts);
  }
};

// `stages` equal stretches of T / stages steps each, k rising evenly from
// k_min (first stage) to k_max (last stage).
struct Step {
  int k_min = 8, k_max = 16;
  std::uint64_t total_steps = 0;  // required: the curriculum's length
  int stages = 4;
  static constexpr const char* kName = "Step";
  int k_at(std::uint64_t t) const {
    if (stages == 1) return k_max;
    const std::uint64_t capped = t >= total_steps ? total_steps - 1 : t;
    const int stage = static_cast<int>(capped * static_cast<std::uint64_t>(stages) / total_steps);
    const double k = k_min + static_cast<double>(k_max - k_min) * stage / (stages - 1);
    return detail::clip(detail::round_half_even(k), k_min, k_max);
  }
  void validate(Index experts) const {
    detail::check_range(kName, k_min, k_max, total_steps, experts);
    moe::detail::require(stages >= 1, "moe::router::schedule::Step: stages=", stages,
                         ", expected >= 1");
  }
};

static_assert(KSchedulePolicy<Constant> && KSchedulePolicy<Linear> && KSchedulePolicy<Cosine> &&
              KSchedulePolicy<Exponential> && KSchedulePolicy<Step>);

}  // namespace schedule
}  // namespace moe::router
