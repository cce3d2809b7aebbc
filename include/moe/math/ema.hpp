#pragma once
// Exponential moving average, shared by backends (Default MoE's expert EMAs).

#include "moe/core/config.hpp"

namespace moe::math {

// beta * old + (1 - beta) * sample.
MOE_HOST_DEVICE inline double ema_update(double old, double beta, double sample) {
  return beta * old + (1.0 - beta) * sample;
}

// Not NaN nor +-Inf: v - v is 0 for every finite v only (and works alike in
// device code, where std::isfinite may be missing).
MOE_HOST_DEVICE inline bool is_finite(double v) { return v - v == 0.0; }

}  // namespace moe::math
