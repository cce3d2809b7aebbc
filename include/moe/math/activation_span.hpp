#pragma once
// The activations of moe/math/activation.hpp over a contiguous span: the
// forward's activation pass calls these once per row. For float on the host
// they run on SIMD packets with Eigen's vector exp and erf (Eigen's
// SpecialFunctions module, the rational erf TensorFlow and XLA use). They
// agree with the scalar formulas evaluated in double within 1e-6 absolute
// plus 1e-6 relative, as the scalar float formulas do (tests/
// test_activation_span.cpp). Every other case runs the scalar formulas
// element by element: double, and anything nvcc compiles (Eigen does not
// vectorise there; nvcc sees only that loop, so the functions are callable
// from the backends' host-device loops).
//
// Each element is computed the same way wherever it sits in the span: the
// tail is padded into one more packet instead of falling back to the scalar
// formula, so a value never depends on a buffer's alignment or on how a row
// was cut (bitwise determinism across runs and thread counts).
//
// The packet width (1: scalar) is a template argument, kActivationLanes by
// default, of every function whose body depends on it, here and in the
// callers that pick a span function (the activation policies, the layer's
// activation pass). A program that links a g++ and an nvcc translation unit
// thus gets two distinct functions, never one inline function with two
// different definitions.

#include <algorithm>
#include <type_traits>

#include "moe/core/config.hpp"
#include "moe/math/activation.hpp"

#if !defined(__CUDACC__)
#include <Eigen/Core>
#include <unsupported/Eigen/SpecialFunctions>
#define MOE_VECTOR_ACTIVATIONS 1
#endif

namespace moe::math {
namespace detail {

#if defined(MOE_VECTOR_ACTIVATIONS)
using FloatPacket = typename Eigen::internal::packet_traits<float>::type;
inline constexpr Index kFloatLanes = Eigen::internal::packet_traits<float>::size;
// Vectorise where Eigen has packets of floats with a vector exp.
inline constexpr bool kVectorFloat =
    kFloatLanes > 1 && Eigen::internal::packet_traits<float>::HasExp;

// f(offset, packets...) over [0, n) in whole packets of kFloatLanes; the
// tail goes through a zero-padded packet. in: the spans read, out: written.
template <int Inputs, int Outputs, class F>
void for_each_packet(Index n, const float* const (&in)[Inputs], float* const (&out)[Outputs],
                     F&& f) {
  namespace ei = Eigen::internal;
  Index j = 0;
  for (; j + kFloatLanes <= n; j += kFloatLanes) {
    FloatPacket x[Inputs], y[Outputs];
    for (int i = 0; i < Inputs; ++i) x[i] = ei::ploadu<FloatPacket>(in[i] + j);
    f(x, y);
    for (int o = 0; o < Outputs; ++o) ei::pstoreu(out[o] + j, y[o]);
  }
  if (j == n) return;
  const Index rest = n - j;
  alignas(64) float buffer[Inputs > Outputs ? Inputs : Outputs][kFloatLanes] = {};
  FloatPacket x[Inputs], y[Outputs];
  for (int i = 0; i < Inputs; ++i) {
    std::copy(in[i] + j, in[i] + n, buffer[i]);
    x[i] = ei::ploadu<FloatPacket>(buffer[i]);
  }
  f(x, y);
  for (int o = 0; o < Outputs; ++o) {
    ei::pstoreu(buffer[o], y[o]);
    std::copy(buffer[o], buffer[o] + rest, out[o] + j);
  }
}

// cdf = Phi(u) = (1 + erf(u / sqrt 2)) / 2.
inline FloatPacket gelu_cdf(const FloatPacket& u) {
  namespace ei = Eigen::internal;
  const FloatPacket half = ei::pset1<FloatPacket>(0.5f);
  const FloatPacket erf = ei::perf(ei::pmul(u, ei::pset1<FloatPacket>(0.70710678118654752440f)));
  return ei::pmul(half, ei::padd(ei::pset1<FloatPacket>(1.0f), erf));
}
// sigmoid(g) = 1 / (1 + exp(-g)).
inline FloatPacket sigmoid(const FloatPacket& g) {
  namespace ei = Eigen::internal;
  const FloatPacket one = ei::pset1<FloatPacket>(1.0f);
  return ei::pdiv(one, ei::padd(one, ei::pexp(ei::pnegate(g))));
}
#else
inline constexpr bool kVectorFloat = false;
#endif

}  // namespace detail

// The float packet width the spans run at in this translation unit.
#if defined(MOE_VECTOR_ACTIVATIONS)
inline constexpr int kActivationLanes = detail::kVectorFloat ? int{detail::kFloatLanes} : 1;
#else
inline constexpr int kActivationLanes = 1;
#endif

namespace detail {
// Whether a span of S runs on packets at this width.
template <class S, int Lanes>
inline constexpr bool kVectorSpan = std::is_same_v<S, float>&& Lanes > 1;
template <int Lanes>
inline constexpr bool kLanesOfThisUnit = Lanes == 1 || Lanes == kActivationLanes;
}  // namespace detail

// value[j] = gelu(u[j]).
template <class S, int Lanes = kActivationLanes>
MOE_HOST_DEVICE void gelu_span(const S* u, S* value, Index n) {
#if defined(MOE_VECTOR_ACTIVATIONS)
  static_assert(detail::kLanesOfThisUnit<Lanes>, "the packet width of this translation unit");
  if constexpr (detail::kVectorSpan<S, Lanes>) {
    detail::for_each_packet<1, 1>(n, {u}, {value}, [](const auto* x, auto* y) {
      y[0] = Eigen::internal::pmul(x[0], detail::gelu_cdf(x[0]));
    });
    return;
  }
#endif
  for (Index j = 0; j < n; ++j) value[j] = gelu(u[j]);
}

// value[j] = gelu(u[j]), and u[j] becomes gelu'(u[j]).
template <class S, int Lanes = kActivationLanes>
MOE_HOST_DEVICE void gelu_and_derivative_span(S* u, S* value, Index n) {
#if defined(MOE_VECTOR_ACTIVATIONS)
  static_assert(detail::kLanesOfThisUnit<Lanes>, "the packet width of this translation unit");
  if constexpr (detail::kVectorSpan<S, Lanes>) {
    namespace ei = Eigen::internal;
    using P = detail::FloatPacket;
    detail::for_each_packet<1, 2>(n, {u}, {value, u}, [](const P* x, P* y) {
      const P cdf = detail::gelu_cdf(x[0]);
      const P minus_half_u2 = ei::pmul(ei::pset1<P>(-0.5f), ei::pmul(x[0], x[0]));
      const P pdf = ei::pmul(ei::pset1<P>(0.39894228040143267794f), ei::pexp(minus_half_u2));
      y[0] = ei::pmul(x[0], cdf);
      y[1] = ei::pmadd(x[0], pdf, cdf);
    });
    return;
  }
#endif
  for (Index j = 0; j < n; ++j) value[j] = gelu_and_derivative(u[j], u[j]);
}

// value[j] = swiglu(gate[j], up[j]).
template <class S, int Lanes = kActivationLanes>
MOE_HOST_DEVICE void swiglu_span(const S* gate, const S* up, S* value, Index n) {
#if defined(MOE_VECTOR_ACTIVATIONS)
  static_assert(detail::kLanesOfThisUnit<Lanes>, "the packet width of this translation unit");
  if constexpr (detail::kVectorSpan<S, Lanes>) {
    namespace ei = Eigen::internal;
    using P = detail::FloatPacket;
    detail::for_each_packet<2, 1>(n, {gate, up}, {value}, [](const P* x, P* y) {
      y[0] = ei::pmul(ei::pmul(x[0], detail::sigmoid(x[0])), x[1]);
    });
    return;
  }
#endif
  for (Index j = 0; j < n; ++j) value[j] = swiglu(gate[j], up[j]);
}

// value[j] = swiglu(gate[j], up[j]); gate[j] and up[j] become its partials.
template <class S, int Lanes = kActivationLanes>
MOE_HOST_DEVICE void swiglu_and_partials_span(S* gate, S* up, S* value, Index n) {
#if defined(MOE_VECTOR_ACTIVATIONS)
  static_assert(detail::kLanesOfThisUnit<Lanes>, "the packet width of this translation unit");
  if constexpr (detail::kVectorSpan<S, Lanes>) {
    namespace ei = Eigen::internal;
    using P = detail::FloatPacket;
    detail::for_each_packet<2, 3>(n, {gate, up}, {value, gate, up}, [](const P* x, P* y) {
      const P one = ei::pset1<P>(1.0f);
      const P s = detail::sigmoid(x[0]);
      const P d_up = ei::pmul(x[0], s);                        // gate s
      const P slope = ei::pmadd(x[0], ei::psub(one, s), one);  // 1 + gate (1 - s)
      y[0] = ei::pmul(d_up, x[1]);                             // gate s up
      y[1] = ei::pmul(ei::pmul(x[1], s), slope);               // up s (1 + ...)
      y[2] = d_up;
    });
    return;
  }
#endif
  for (Index j = 0; j < n; ++j) {
    S d_gate, d_up;
    value[j] = swiglu_and_partials(gate[j], up[j], d_gate, d_up);
    gate[j] = d_gate;
    up[j] = d_up;
  }
}

}  // namespace moe::math
