#pragma once
#include <concepts>

namespace moe {

// An expert activation: element-wise (value(u), derivative(u)) or gated
// (value(gate, up), partials(gate, up, d_gate, d_up)), see moe/activation/.
// Optional: value_and_derivative(u, d) / value_and_partials(g, u, dg, du),
// which a training forward uses to compute both in one pass (the layer
// falls back to calling value and derivative/partials); and the same over a
// span of a row, value_span(u, out, n) / value_and_derivative_span(u, out, n)
// (u becomes the derivative), gated value_span(g, u, out, n) /
// value_and_partials_span(g, u, out, n) (g and u become the partials), which
// the forward's activation pass calls once per row so that a policy can
// vectorise (the layer falls back to the element-wise functions).
template <class A>
concept ElementwiseActivation = !A::kGated && requires(double u) {
  { A::value(u) } -> std::same_as<double>;
  { A::derivative(u) } -> std::same_as<double>;
};

template <class A>
concept GatedActivation = A::kGated && requires(double g, double u, double& dg, double& du) {
  { A::value(g, u) } -> std::same_as<double>;
  A::partials(g, u, dg, du);
};

template <class A>
concept ActivationPolicy = requires {
  { A::kGated } -> std::convertible_to<bool>;
  { A::kSupportsBias } -> std::convertible_to<bool>;
  { A::kName } -> std::convertible_to<const char*>;
}
&&(ElementwiseActivation<A> || GatedActivation<A>);

}  // namespace moe
