#pragma once
// Element-wise expert activations and their derivatives, shared by backends.

#include <cmath>

#include "moe/core/config.hpp"

namespace moe::math {

template <class S>
MOE_HOST_DEVICE S relu(S u) {
  return u > S(0) ? u : S(0);
}
template <class S>
MOE_HOST_DEVICE S relu_derivative(S u) {
  return u > S(0) ? S(1) : S(0);
}

// Exact GELU, u * Phi(u) (Hendrycks & Gimpel 2016), as torch.nn.GELU() default.
template <class S>
MOE_HOST_DEVICE S gelu(S u) {
  return S(0.5) * u * (S(1) + std::erf(u * S(0.70710678118654752440)));
}
// GELU and its derivative in one pass, sharing the erf: the forward of a
// training step stores the derivative for the backward. u * cdf equals
// gelu(u) bitwise (the factor 0.5 is exact).
template <class S>
MOE_HOST_DEVICE S gelu_and_derivative(S u, S& derivative) {
  const S cdf = S(0.5) * (S(1) + std::erf(u * S(0.70710678118654752440)));
  const S pdf = S(0.39894228040143267794) * std::exp(S(-0.5) * u * u);
  derivative = cdf + u * pdf;
  return u * cdf;
}
template <class S>
MOE_HOST_DEVICE S gelu_derivative(S u) {
  S derivative;
  gelu_and_derivative(u, derivative);
  return derivative;
}

template <class S>
MOE_HOST_DEVICE S sigmoid(S u) {
  return S(1) / (S(1) + std::exp(-u));
}

// SwiGLU unit (Shazeer 2020): silu(gate) * up.
template <class S>
MOE_HOST_DEVICE S swiglu(S gate, S up) {
  return gate * sigmoid(gate) * up;
}
// swiglu(gate, up) and its partial derivatives, sharing the sigmoid.
template <class S>
MOE_HOST_DEVICE S swiglu_and_partials(S gate, S up, S& d_gate, S& d_up) {
  const S s = sigmoid(gate);
  d_up = gate * s;
  d_gate = up * s * (S(1) + gate * (S(1) - s));
  return d_up * up;
}
template <class S>
MOE_HOST_DEVICE void swiglu_partials(S gate, S up, S& d_gate, S& d_up) {
  swiglu_and_partials(gate, up, d_gate, d_up);
}

}  // namespace moe::math
