#pragma once
// Expert activation policies (docs/algorithms.md section 1). An element-wise policy
// maps one GEMM1 output u to act(u); a gated policy (SwiGLU) maps the pair
// (gate_j, up_j) taken from a GEMM1 output twice as wide, so every activation
// runs the same two GEMMs per expert.

#include "moe/core/concepts.hpp"
#include "moe/math/activation.hpp"
#include "moe/math/activation_span.hpp"

namespace moe::act {

// E(x) = W2 relu(W1 x + b1) + b2.
struct ReLU {
  static constexpr bool kGated = false;
  static constexpr bool kSupportsBias = true;
  static constexpr const char* kName = "relu";
  template <class S>
  MOE_HOST_DEVICE static S value(S u) {
    return math::relu(u);
  }
  template <class S>
  MOE_HOST_DEVICE static S derivative(S u) {
    return math::relu_derivative(u);
  }
};

// E(x) = W2 gelu(W1 x + b1) + b2, exact (erf) GELU.
struct GELU {
  static constexpr bool kGated = false;
  static constexpr bool kSupportsBias = true;
  static constexpr const char* kName = "gelu";
  template <class S>
  MOE_HOST_DEVICE static S value(S u) {
    return math::gelu(u);
  }
  template <class S>
  MOE_HOST_DEVICE static S derivative(S u) {
    return math::gelu_derivative(u);
  }
  template <class S>
  MOE_HOST_DEVICE static S value_and_derivative(S u, S& derivative) {
    return math::gelu_and_derivative(u, derivative);
  }
  // A row at a time: vectorised erf and exp on the CPU.
  // (Lanes: see moe/math/activation_span.hpp.)
  template <class S, int Lanes = math::kActivationLanes>
  MOE_HOST_DEVICE static void value_span(const S* u, S* value, Index n) {
    math::gelu_span<S, Lanes>(u, value, n);
  }
  template <class S, int Lanes = math::kActivationLanes>
  MOE_HOST_DEVICE static void value_and_derivative_span(S* u, S* value, Index n) {
    math::gelu_and_derivative_span<S, Lanes>(u, value, n);
  }
};

// E(x) = W2 (silu(W1 x) * (W3 x)), no biases (Shazeer 2020; ReMoE, Default MoE).
// The layer stores [W1 | W3] side by side as "experts.w1" of width 2 d_ff.
struct SwiGLU {
  static constexpr bool kGated = true;
  static constexpr bool kSupportsBias = false;
  static constexpr const char* kName = "swiglu";
  template <class S>
  MOE_HOST_DEVICE static S value(S gate, S up) {
    return math::swiglu(gate, up);
  }
  template <class S>
  MOE_HOST_DEVICE static void partials(S gate, S up, S& d_gate, S& d_up) {
    math::swiglu_partials(gate, up, d_gate, d_up);
  }
  template <class S>
  MOE_HOST_DEVICE static S value_and_partials(S gate, S up, S& d_gate, S& d_up) {
    return math::swiglu_and_partials(gate, up, d_gate, d_up);
  }
  // A row at a time: vectorised exp on the CPU.
  template <class S, int Lanes = math::kActivationLanes>
  MOE_HOST_DEVICE static void value_span(const S* gate, const S* up, S* value, Index n) {
    math::swiglu_span<S, Lanes>(gate, up, value, n);
  }
  template <class S, int Lanes = math::kActivationLanes>
  MOE_HOST_DEVICE static void value_and_partials_span(S* gate, S* up, S* value, Index n) {
    math::swiglu_and_partials_span<S, Lanes>(gate, up, value, n);
  }
};

static_assert(ActivationPolicy<ReLU>);
static_assert(ActivationPolicy<GELU>);
static_assert(ActivationPolicy<SwiGLU>);

}  // namespace moe::act
