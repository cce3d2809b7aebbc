#pragma once
// k curricula for top-k routers (SMoE-Dropout, Chen et al., "Sparse MoE as the
// New Dropout", ICLR 2023; docs/algorithms.md 3.4). A schedule maps t, the
// number of optimiser steps done, to the k of the next training step.
//
// Each curriculum of the paper's code (calculate_gate_number) computes that
// curve over T = total_steps: round is half to even (Python's), cos and pow
// are the C library's double functions (the code's np.cos may differ by a
// few ulp; no k differed in an exhaustive scan), and every value is clipped
// to [k_min, k_max]. Past T [choice]: the linear, cosine and multi-step curves
// hold their value at T (the cosine formula would turn back after 3 T, and
// the paper's multi-step indexing runs out at T); exp_increase keeps
// following its formula, which only approaches k_max.

#include <cmath>
#include <concepts>
#include <cstdint>
#include <vector>

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
  moe::detail::require(total >= 1 && total <= (std::uint64_t{1} << 53),
                       "moe::router::schedule::", name, ": total_steps=", total,
                       ", expected 1 <= total_steps <= 2^53");
  // (k_max - k_min) t, with t capped at total, stays below 2^62.
  moe::detail::require(
      static_cast<std::uint64_t>(k_max - k_min) <= (std::uint64_t{1} << 62) / total,
      "moe::router::schedule::", name, ": (k_max - k_min) total_steps=", k_max - k_min, " x ",
      total, ", expected below 2^62");
}
// Round half to even, as Python's round() in the paper's code.
inline long long round_half_even(double v) {
  const double floor_v = std::floor(v);
  const double frac = v - floor_v;
  auto n = static_cast<long long>(floor_v);
  if (frac > 0.5 || (frac == 0.5 && n % 2 != 0)) ++n;
  return n;
}
// round_half_even(num / den) for whole numbers, exactly (Python divides ints
// with one correct rounding, so its .5 quotients are exact too). num < 2^62
// (check_range bounds the products).
inline long long round_quotient(std::uint64_t num, std::uint64_t den) {
  std::uint64_t q = num / den;
  const std::uint64_t twice_rem = 2 * (num % den);
  if (twice_rem > den || (twice_rem == den && q % 2 == 1)) ++q;
  return static_cast<long long>(q);
}
inline int clip(long long k, int lo, int hi) {
  return static_cast<int>(k < lo ? lo : (k > hi ? hi : k));
}
inline std::uint64_t capped(std::uint64_t t, std::uint64_t total) { return t < total ? t : total; }
// k_at before validate() (a schedule is asked for k at construction): a
// schedule that check_range will refuse, whose arithmetic could overflow
// (k_max - k_min as an int, the products past 2^62, 2 T past 2^64), or one
// without values, is k_min until validate() refuses it.
inline bool unusable(int k_min, int k_max, std::uint64_t total) {
  if (k_min < 1 || k_min > k_max) return true;  // k_max - k_min fits an int below
  return total == 0 || total > (std::uint64_t{1} << 53) ||
         static_cast<std::uint64_t>(k_max - k_min) > (std::uint64_t{1} << 62) / total;
}
// cos(pi t / (2 T)), computed as the paper's np.cos(np.pi * t / (2 * T)).
inline double quarter_cosine(std::uint64_t t, std::uint64_t total) {
  return std::cos(3.141592653589793 * static_cast<double>(t) / static_cast<double>(2 * total));
}
}  // namespace detail

// A fixed k (inference at any k: self-slimming).
struct Constant {
  int k = 2;
  static constexpr const char* kName = "Constant";
  int k_at(std::uint64_t) const { return k; }
  void validate(Index experts) const { detail::check_range(kName, k, k, 1, experts); }
};

// linear_increase, the paper's default: round((k_max - k_min) t / T) + k_min.
struct Linear {
  int k_min = 8, k_max = 16;
  std::uint64_t total_steps = 0;  // required: the curriculum's length T
  static constexpr const char* kName = "Linear";
  int k_at(std::uint64_t t) const {
    if (detail::unusable(k_min, k_max, total_steps)) return k_min;
    const auto span = static_cast<std::uint64_t>(k_max - k_min);
    return detail::clip(
        detail::round_quotient(span * detail::capped(t, total_steps), total_steps) + k_min, k_min,
        k_max);
  }
  void validate(Index experts) const {
    detail::check_range(kName, k_min, k_max, total_steps, experts);
  }
};

// linear_decrease: round((k_min - k_max) t / T) + k_max.
struct LinearDecrease {
  int k_min = 8, k_max = 16;
  std::uint64_t total_steps = 0;
  static constexpr const char* kName = "LinearDecrease";
  int k_at(std::uint64_t t) const {
    // round(-x) = -round(x) for half to even.
    if (detail::unusable(k_min, k_max, total_steps)) return k_min;
    const auto span = static_cast<std::uint64_t>(k_max - k_min);
    return detail::clip(
        k_max - detail::round_quotient(span * detail::capped(t, total_steps), total_steps), k_min,
        k_max);
  }
  void validate(Index experts) const {
    detail::check_range(kName, k_min, k_max, total_steps, experts);
  }
};

// cosine_increase: round((k_min - k_max) cos(pi t / (2 T))) + k_max.
struct CosineIncrease {
  int k_min = 8, k_max = 16;
  std::uint64_t total_steps = 0;
  static constexpr const char* kName = "CosineIncrease";
  int k_at(std::uint64_t t) const {
    if (detail::unusable(k_min, k_max, total_steps)) return k_min;
    const double c = detail::quarter_cosine(detail::capped(t, total_steps), total_steps);
    return detail::clip(detail::round_half_even(static_cast<double>(k_min - k_max) * c) + k_max,
                        k_min, k_max);
  }
  void validate(Index experts) const {
    detail::check_range(kName, k_min, k_max, total_steps, experts);
  }
};

// cosine_decrease: round((k_max - k_min) cos(pi t / (2 T))) + k_min.
struct CosineDecrease {
  int k_min = 8, k_max = 16;
  std::uint64_t total_steps = 0;
  static constexpr const char* kName = "CosineDecrease";
  int k_at(std::uint64_t t) const {
    if (detail::unusable(k_min, k_max, total_steps)) return k_min;
    const double c = detail::quarter_cosine(detail::capped(t, total_steps), total_steps);
    return detail::clip(detail::round_half_even(static_cast<double>(k_max - k_min) * c) + k_min,
                        k_min, k_max);
  }
  void validate(Index experts) const {
    detail::check_range(kName, k_min, k_max, total_steps, experts);
  }
};

// exp_increase: round((k_min - k_max) 0.99^floor(t / i)) + k_max with
// i = max(1, floor(T / 300)) (the paper's code divides by floor(T / 300),
// which is 0 below T = 300).
struct ExpIncrease {
  int k_min = 8, k_max = 16;
  std::uint64_t total_steps = 0;
  static constexpr const char* kName = "ExpIncrease";
  int k_at(std::uint64_t t) const {
    if (detail::unusable(k_min, k_max, total_steps)) return k_min;
    const std::uint64_t interval = total_steps / 300 > 0 ? total_steps / 300 : 1;
    const double decay = std::pow(0.99, static_cast<double>(t / interval));
    return detail::clip(detail::round_half_even(static_cast<double>(k_min - k_max) * decay) + k_max,
                        k_min, k_max);
  }
  void validate(Index experts) const {
    detail::check_range(kName, k_min, k_max, total_steps, experts);
  }
};

// multi_step_increase / multi_step_decrease: an explicit list of n values,
// k = values[min(floor(n t / T), n - 1)], clipped. The paper's lists are
// increasing() = {1, 2, 4, 8, 16} and decreasing() = {16, 8, 4, 2, 1}.
struct MultiStep {
  int k_min = 1, k_max = 16;
  std::uint64_t total_steps = 0;
  std::vector<int> values = increasing();
  static constexpr const char* kName = "MultiStep";
  static std::vector<int> increasing() { return {1, 2, 4, 8, 16}; }
  static std::vector<int> decreasing() { return {16, 8, 4, 2, 1}; }
  int k_at(std::uint64_t t) const {
    if (detail::unusable(k_min, k_max, total_steps) || values.empty()) return k_min;
    const auto n = static_cast<std::uint64_t>(values.size());
    const std::uint64_t index = n * detail::capped(t, total_steps) / total_steps;
    return detail::clip(values[static_cast<std::size_t>(index < n ? index : n - 1)], k_min, k_max);
  }
  void validate(Index experts) const {
    detail::check_range(kName, k_min, k_max, total_steps, experts);
    moe::detail::require(!values.empty(),
                         "moe::router::schedule::MultiStep: values is empty, expected at least one "
                         "k");
    for (std::size_t i = 0; i < values.size(); ++i)
      moe::detail::require(values[i] >= 1, "moe::router::schedule::MultiStep: values[", i,
                           "]=", values[i], ", expected >= 1");
    moe::detail::require(values.size() <= (std::uint64_t{1} << 62) / total_steps,
                         "moe::router::schedule::MultiStep: ", values.size(),
                         " values x total_steps=", total_steps, ", expected below 2^62");
  }
};

static_assert(KSchedulePolicy<Constant> && KSchedulePolicy<Linear> &&
              KSchedulePolicy<LinearDecrease> && KSchedulePolicy<CosineIncrease> &&
              KSchedulePolicy<CosineDecrease> && KSchedulePolicy<ExpIncrease> &&
              KSchedulePolicy<MultiStep>);

}  // namespace schedule
}  // namespace moe::router
