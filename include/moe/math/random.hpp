#pragma once
// Counter-based random numbers: every draw is a pure function of (seed, stream,
// index). Initialisation and dropout masks are therefore the same on every
// platform, standard library, thread count and backend (std::*_distribution
// is implementation-defined, so it is not used).

#include <cmath>
#include <cstdint>

#include "moe/core/config.hpp"

namespace moe::math {

// SplitMix64 finaliser (Steele, Lea, Flood 2014): a bijective 64-bit mixer.
MOE_HOST_DEVICE inline std::uint64_t mix64(std::uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

MOE_HOST_DEVICE inline std::uint64_t hash3(std::uint64_t seed, std::uint64_t stream,
                                           std::uint64_t index) {
  return mix64(mix64(mix64(seed) ^ stream) ^ index);
}

// Uniform in [0, 1) with 53 random bits.
MOE_HOST_DEVICE inline double uniform01(std::uint64_t seed, std::uint64_t stream,
                                        std::uint64_t index) {
  return static_cast<double>(hash3(seed, stream, index) >> 11) * 0x1.0p-53;
}

// Standard normal by Box-Muller from two independent uniforms.
MOE_HOST_DEVICE inline double standard_normal(std::uint64_t seed, std::uint64_t stream,
                                              std::uint64_t index) {
  const double u1 = 1.0 - uniform01(seed, stream, 2 * index);  // in (0, 1]
  const double u2 = uniform01(seed, stream, 2 * index + 1);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

}  // namespace moe::math
