#pragma once
#include <concepts>

namespace moe {

// An expert activation: element-wise (value(u), derivative(u)) or gated
// (value(gate, up), partials(gate, up, d_gate, d_up)), see moe/activation/.
// Optional: value_and_derivative(u, d) / value_and_partials(g, u, dg, du),
// which a training forward uses to compute both in one pass (the layer
// falls back to calling value and derivative/partials).
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
