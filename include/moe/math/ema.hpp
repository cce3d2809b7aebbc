#pragma once
// Exponential moving average, shared by backends (Default MoE's expert EMAs).

#include "moe/core/config.hpp"

namespace moe::math {

// beta * old + (1 - beta) * sample.
MOE_HOST_DEVICE inline double ema_update(double old, double beta, double sample) {
  return beta * old + (1.0 - beta) * sample;
}

}  // namespace moe::math
