// The activations over a span (moe/math/activation_span.hpp) against the
// scalar formulas evaluated in double: the vectorised float path stays within
// a stated error, every element is computed the same way wherever it sits in
// a span, and double runs the scalar formulas exactly.
#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "moe/activation/activations.hpp"
#include "moe/math/activation_span.hpp"

using namespace moe;

namespace {

// u from -12 to 12 in steps of 1/512, then values where the formulas clamp or
// saturate (exp overflow, erf = +-1, the smallest normals, zero).
std::vector<float> inputs() {
  std::vector<float> u;
  for (int i = -12 * 512; i <= 12 * 512; ++i) u.push_back(static_cast<float>(i) / 512.0f);
  for (float v : {0.0f, -0.0f, 1e-30f, -1e-30f, 1e-7f, 3.9f, 4.0f, 4.1f, 5.5f, 30.0f, 87.0f, 88.8f,
                  89.0f, 100.0f, 1e4f, std::numeric_limits<float>::min()}) {
    u.push_back(v);
    u.push_back(-v);
  }
  return u;
}

// |got - want| <= abs + rel |want|, with the largest excess reported.
struct Bound {
  double abs, rel;
  double worst = 0;
  double at = 0;
  void check(double got, double want, double where) {
    const double excess = std::abs(got - want) - (abs + rel * std::abs(want));
    if (excess > worst) worst = excess, at = where;
  }
};

// The float path's stated accuracy: Eigen's rational erf (a few 1e-7
// absolute) and exp (about 1 ulp), through a few roundings.
constexpr double kAbs = 1e-6, kRel = 1e-6;

}  // namespace

TEST_CASE("GELU over a span agrees with the formula in double") {
  const std::vector<float> u = inputs();
  const auto n = static_cast<Index>(u.size());
  std::vector<float> value(u.size()), value_only(u.size()), derivative = u;
  math::gelu_and_derivative_span(derivative.data(), value.data(), n);
  math::gelu_span(u.data(), value_only.data(), n);
  Bound v{kAbs, kRel}, d{kAbs, kRel};
  for (std::size_t j = 0; j < u.size(); ++j) {
    double want_derivative;
    const double want = math::gelu_and_derivative(static_cast<double>(u[j]), want_derivative);
    v.check(value[j], want, u[j]);
    d.check(derivative[j], want_derivative, u[j]);
    // Training and evaluation compute the same value.
    REQUIRE(value_only[j] == value[j]);
  }
  CHECK_MESSAGE(v.worst <= 0, "gelu off by ", v.worst, " past the bound at u = ", v.at);
  CHECK_MESSAGE(d.worst <= 0, "gelu' off by ", d.worst, " past the bound at u = ", d.at);
}

TEST_CASE("SwiGLU over a span agrees with the formula in double") {
  const std::vector<float> g = inputs();
  std::vector<float> up(g.size());
  for (std::size_t j = 0; j < g.size(); ++j) up[j] = std::cos(0.37f * static_cast<float>(j)) * 3;
  const auto n = static_cast<Index>(g.size());
  std::vector<float> value(g.size()), value_only(g.size()), d_gate = g, d_up = up;
  math::swiglu_and_partials_span(d_gate.data(), d_up.data(), value.data(), n);
  math::swiglu_span(g.data(), up.data(), value_only.data(), n);
  Bound v{kAbs, kRel}, dg{kAbs, kRel}, du{kAbs, kRel};
  for (std::size_t j = 0; j < g.size(); ++j) {
    double want_gate, want_up;
    const double want = math::swiglu_and_partials(static_cast<double>(g[j]),
                                                  static_cast<double>(up[j]), want_gate, want_up);
    v.check(value[j], want, g[j]);
    dg.check(d_gate[j], want_gate, g[j]);
    du.check(d_up[j], want_up, g[j]);
    REQUIRE(value_only[j] == value[j]);
  }
  CHECK_MESSAGE(v.worst <= 0, "swiglu off by ", v.worst, " past the bound at gate = ", v.at);
  CHECK_MESSAGE(dg.worst <= 0, "d/dgate off by ", dg.worst, " at gate = ", dg.at);
  CHECK_MESSAGE(du.worst <= 0, "d/dup off by ", du.worst, " at gate = ", du.at);
}

TEST_CASE("an element's value does not depend on where it sits in the span") {
  // The same 37 inputs as spans of every length and misalignment: the tail
  // and the packets must agree bitwise (determinism across runs and cuts).
  std::vector<float> storage(64 + 37);
  std::vector<float> want_value(37), want_derivative(37);
  std::vector<float> base(37);
  for (int j = 0; j < 37; ++j) base[j] = -4.0f + 0.23f * static_cast<float>(j);
  want_derivative = base;
  math::gelu_and_derivative_span(want_derivative.data(), want_value.data(), 37);
  for (int offset = 0; offset < 17; ++offset) {
    for (int start = 0; start < 37; ++start) {
      const Index n = 37 - start;
      float* u = storage.data() + offset;
      std::copy(base.begin() + start, base.end(), u);
      std::vector<float> value(static_cast<std::size_t>(n));
      math::gelu_and_derivative_span(u, value.data(), n);
      for (Index j = 0; j < n; ++j) {
        REQUIRE(value[j] == want_value[start + j]);
        REQUIRE(u[j] == want_derivative[start + j]);
      }
    }
  }
}

TEST_CASE("double runs the scalar formulas exactly") {
  const std::vector<double> u = {-7.5, -1.25, -1e-3, 0.0, 0.5, 2.0, 9.0};
  const auto n = static_cast<Index>(u.size());
  std::vector<double> value(u.size()), derivative = u;
  math::gelu_and_derivative_span(derivative.data(), value.data(), n);
  std::vector<double> d_gate = u, d_up(u.rbegin(), u.rend()), gated(u.size());
  const std::vector<double> up = d_up;
  math::swiglu_and_partials_span(d_gate.data(), d_up.data(), gated.data(), n);
  for (std::size_t j = 0; j < u.size(); ++j) {
    CHECK(value[j] == math::gelu(u[j]));
    CHECK(derivative[j] == math::gelu_derivative(u[j]));
    double want_gate, want_up;
    CHECK(gated[j] == math::swiglu_and_partials(u[j], up[j], want_gate, want_up));
    CHECK(d_gate[j] == want_gate);
    CHECK(d_up[j] == want_up);
  }
}

TEST_CASE("the policies expose the span functions the layer calls") {
  float u[3] = {-1.0f, 0.0f, 2.0f}, gate[3] = {-1.0f, 0.0f, 2.0f}, up[3] = {1, 2, 3}, v[3];
  static_assert(requires { act::GELU::value_and_derivative_span(u, v, Index{3}); });
  static_assert(requires { act::GELU::value_span(u, v, Index{3}); });
  static_assert(requires { act::SwiGLU::value_and_partials_span(gate, up, v, Index{3}); });
  static_assert(requires { act::SwiGLU::value_span(gate, up, v, Index{3}); });
#if defined(__AVX2__) || defined(__AVX512F__) || defined(__SSE2__)
  // x86 builds vectorise float (the speed this header is for).
  CHECK(math::detail::kVectorSpan<float>);
#endif
  act::GELU::value_span(u, v, 3);
  CHECK(v[1] == 0.0f);
  CHECK(v[2] == doctest::Approx(2.0 * 0.97724986805182079).epsilon(1e-6));
}
