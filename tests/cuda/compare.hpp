#pragma once
// Comparing the outcomes of the cases (cases.hpp) of two backends, output by
// output. Shared by the GPU suite
// (test_cuda) and the GPU-call-pattern test on the CPU (test_gpu_pattern).

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "cases.hpp"

namespace moe::gpu_test {

// max |a - b| <= tolerance * max |b| (b: the CPU reference).
template <class U>
void expect_close(const std::vector<U>& a, const std::vector<U>& b, double tolerance,
                  const std::string& what) {
  CAPTURE(what);
  REQUIRE(a.size() == b.size());
  double error = 0, scale = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double ai = static_cast<double>(a[i]), bi = static_cast<double>(b[i]);
    error = std::isfinite(ai) ? std::max(error, std::abs(ai - bi)) : INFINITY;
    scale = std::max(scale, std::abs(bi));
  }
  CAPTURE(error);
  CAPTURE(scale);
  CHECK(error <= tolerance * scale);
}

// The same, tensor by tensor: each against its own largest value, so that a
// small tensor (a bias gradient, the EMA) is not judged by a large one.
template <class U>
void expect_close_tensors(const std::vector<U>& a, const std::vector<U>& b,
                          const std::vector<moe::TensorSpec>& specs, double tolerance,
                          const std::string& what) {
  REQUIRE(a.size() == b.size());
  for (const auto& spec : specs) {
    const auto first = static_cast<std::ptrdiff_t>(spec.offset);
    const auto last = first + static_cast<std::ptrdiff_t>(spec.size());
    expect_close(std::vector<U>(a.begin() + first, a.begin() + last),
                 std::vector<U>(b.begin() + first, b.begin() + last), tolerance,
                 what + " " + spec.name);
  }
}

inline void compare(const std::vector<Outcome>& gpu, const std::vector<Outcome>& cpu,
                    double tolerance) {
  REQUIRE(gpu.size() == cpu.size());
  for (std::size_t i = 0; i < cpu.size(); ++i) {
    const Outcome& g = gpu[i];
    const Outcome& c = cpu[i];
    CAPTURE(c.name);
    REQUIRE(g.name == c.name);
    expect_close(g.y, c.y, tolerance, "y");
    expect_close(g.dx, c.dx, tolerance, "dx");
    expect_close_tensors(g.grads, c.grads, c.grad_tensors, tolerance, "gradient");
    expect_close(g.y_eval, c.y_eval, tolerance, "eval y");
    expect_close_tensors(g.state, c.state, c.state_tensors, tolerance, "state");
    CHECK(g.tokens_per_expert == c.tokens_per_expert);
    CHECK(g.dropped == c.dropped);
    CHECK(std::abs(g.aux_loss - c.aux_loss) <= tolerance * std::max(std::abs(c.aux_loss), 1e-30));
  }
}

}  // namespace moe::gpu_test
