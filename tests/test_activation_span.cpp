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

namespace {
// Every span function on (a, b): its outputs, concatenated.
std::vector<float> all_spans(const float* a, const float* b, Index n) {
  std::vector<float> out;
  std::vector<float> v(n), u(a, a + n), g(a, a + n), up(b, b + n);
  math::gelu_span(a, v.data(), n);
  out.insert(out.end(), v.begin(), v.end());
  math::gelu_and_derivative_span(u.data(), v.data(), n);
  out.insert(out.end(), v.begin(), v.end());
  out.insert(out.end(), u.begin(), u.end());
  math::swiglu_span(a, b, v.data(), n);
  out.insert(out.end(), v.begin(), v.end());
  math::swiglu_and_partials_span(g.data(), up.data(), v.data(), n);
  for (const auto* part : {&v, &g, &up}) out.insert(out.end(), part->begin(), part->end());
  return out;
}
}  // namespace

TEST_CASE("an element's value does not depend on where it sits in the span") {
  // The same 37 inputs as spans of every length and misalignment: the tail
  // and the packets must agree bitwise (determinism across runs and cuts).
  constexpr Index kN = 37;
  std::vector<float> a(kN), b(kN);
  for (Index j = 0; j < kN; ++j) {
    a[j] = -4.0f + 0.23f * static_cast<float>(j);
    b[j] = 1.5f - 0.11f * static_cast<float>(j);
  }
  const std::vector<float> whole = all_spans(a.data(), b.data(), kN);
  std::vector<float> storage(2 * (64 + kN));
  for (Index offset = 0; offset < 17; ++offset) {
    for (Index start = 0; start < kN; ++start) {
      const Index n = kN - start;
      float* sa = storage.data() + offset;
      float* sb = sa + 64 + kN;
      std::copy(a.begin() + start, a.end(), sa);
      std::copy(b.begin() + start, b.end(), sb);
      const std::vector<float> part = all_spans(sa, sb, n);
      for (Index f = 0; f < 7; ++f)  // the 7 outputs
        for (Index j = 0; j < n; ++j) REQUIRE(part[f * n + j] == whole[f * kN + start + j]);
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
  CHECK(math::kActivationLanes > 1);
#endif
  // Width 1 is the scalar formula (what nvcc compiles), a function of its
  // own: a program linking both kinds of units keeps both definitions.
  float scalar[3];
  math::gelu_span<float, 1>(u, scalar, 3);
  for (int j = 0; j < 3; ++j) CHECK(scalar[j] == math::gelu(u[j]));
  if constexpr (math::kActivationLanes > 1)
    CHECK((&math::gelu_span<float, 1> != &math::gelu_span<float, math::kActivationLanes>));
  act::GELU::value_span(u, v, 3);
  CHECK(v[1] == 0.0f);
  CHECK(v[2] == doctest::Approx(2.0 * 0.97724986805182079).epsilon(1e-6));
}
