// A wrong policy is rejected by its concept (the compile-fail tests show the
// one-line error; these pin down what each concept accepts and refuses).

#include "support.hpp"

using namespace moe;

namespace {

struct NotARouter {};
struct RouterWithoutBackward {
  static constexpr const char* kName = "partial";
  template <class B>
  struct Cache {};
  void validate(const LayerConfig&) const {}
  Index nominal_k() const { return 1; }
  void add_parameters(TensorLayout&, const LayerConfig&) const {}
  template <class S>
  void init(TensorBuffer<S>&, const LayerConfig&, std::uint64_t) const {}
  template <class B>
  void forward(const B&, Mode, ConstMatrixView<typename B::Scalar>,
               const TensorBuffer<typename B::Scalar>&, const ForwardContext&,
               Selection<typename B::Scalar, B::template Buffer>&, Cache<B>&) const {}
};
struct NotAnActivation {};
struct ActivationWithoutDerivative {
  static constexpr bool kGated = false;
  static constexpr bool kSupportsBias = true;
  static constexpr const char* kName = "half";
  static double value(double u) { return u; }
};
struct GatedClaimingElementwise {  // says gated, provides the element-wise interface
  static constexpr bool kGated = true;
  static constexpr bool kSupportsBias = false;
  static constexpr const char* kName = "confused";
  static double value(double u) { return u; }
  static double derivative(double) { return 1; }
};
struct NotAnEstimator {};
struct NotABackend {
  using Scalar = float;
};

}  // namespace

TEST_CASE("concepts accept the library's policies") {
  static_assert(RouterPolicy<router::TopK, cpu::Backend<float>>);
  static_assert(RouterPolicy<router::TopK, cpu::Backend<double>>);
  static_assert(EstimatorPolicy<estimator::Sparse, cpu::Backend<float>>);
  static_assert(ActivationPolicy<act::ReLU> && ActivationPolicy<act::GELU> &&
                ActivationPolicy<act::SwiGLU>);
  static_assert(BackendPolicy<cpu::Backend<float>> && BackendPolicy<cpu::Backend<double>>);
  CHECK(true);
}

TEST_CASE("concepts refuse incomplete policies") {
  static_assert(!RouterPolicy<NotARouter, cpu::Backend<float>>);
  static_assert(!RouterPolicy<RouterWithoutBackward, cpu::Backend<float>>);
  static_assert(!ActivationPolicy<NotAnActivation>);
  static_assert(!ActivationPolicy<ActivationWithoutDerivative>);
  static_assert(!ActivationPolicy<GatedClaimingElementwise>);
  static_assert(!EstimatorPolicy<NotAnEstimator, cpu::Backend<float>>);
  static_assert(!BackendPolicy<NotABackend>);
  CHECK(true);
}
