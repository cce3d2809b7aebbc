// The GPU suite: every case of cases.hpp on the CUDA backend (fp32 and bf16
// experts) against the CPU backend, output by output: y, dx, every gradient,
// the state (EMA, counters, lambda, schedule step), the routing statistics
// and an eval forward. fp32 agrees to 1e-5 and bf16 to 1e-2, relative to the
// largest CPU value of each array.
//
// Without a CUDA device it exits 77, which CTest reports as skipped (never
// passed). `test_cuda --reference-only` runs just the CPU half: CI runs that
// everywhere, so the harness itself is exercised without a GPU.

#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>

#include "bf16_reference.hpp"
#include "compare.hpp"
#include "moe/moe.hpp"

namespace {

using moe::gpu_test::Outcome;
bool reference_only = false;

std::vector<Outcome> run_on_cpu() { return moe::gpu_test::run_cases(moe::cpu::Backend<float>(1)); }
// The reference of bf16 experts: the same operands rounded to bf16 first.
std::vector<Outcome> run_on_cpu_bf16() {
  return moe::gpu_test::run_cases(moe::gpu_test::Bf16OperandsBackend());
}

bool finite(const std::vector<float>& v) {
  return std::all_of(v.begin(), v.end(), [](float f) { return std::isfinite(f); });
}
bool nonzero(const std::vector<float>& v) {
  return std::any_of(v.begin(), v.end(), [](float f) { return f != 0.0f; });
}

}  // namespace

TEST_CASE("the CPU reference of every case is finite, non-trivial and repeatable") {
  const auto first = run_on_cpu();
  const auto second = run_on_cpu();
  REQUIRE(first.size() == 16);
  for (std::size_t i = 0; i < first.size(); ++i) {
    const Outcome& o = first[i];
    CAPTURE(o.name);
    CHECK(finite(o.y));
    CHECK(finite(o.dx));
    CHECK(finite(o.grads));
    CHECK(nonzero(o.y));
    CHECK(nonzero(o.dx));
    CHECK(nonzero(o.grads));
    CHECK(o.y == second[i].y);
    CHECK(o.grads == second[i].grads);
    CHECK(o.state == second[i].state);
    for (const auto& spec : o.grad_tensors) {  // every gradient tensor takes part
      CAPTURE(spec.name);
      const auto begin = o.grads.begin() + static_cast<std::ptrdiff_t>(spec.offset);
      CHECK((!spec.trainable || std::any_of(begin, begin + static_cast<std::ptrdiff_t>(spec.size()),
                                            [](float f) { return f != 0.0f; })));
    }
  }
  // The cases reach what they are named for.
  const auto named = [&](const char* name) -> const Outcome& {
    const auto it =
        std::find_if(first.begin(), first.end(), [&](const Outcome& o) { return o.name == name; });
    REQUIRE(it != first.end());
    return *it;
  };
  CHECK(named("topk/sparse/gelu+capacity").dropped > 0);
  const auto& idle = named("topk/default_ema/swiglu idle experts").tokens_per_expert;
  CHECK(std::count(idle.begin(), idle.end(), moe::Index{0}) > 0);
  CHECK(named("topk/sparse/swiglu T=1").y.size() == 24);
}

TEST_CASE("the CPU reference of bf16 experts rounds the expert GEMMs' operands to bf16") {
  const auto fp32 = run_on_cpu();
  const auto bf16 = run_on_cpu_bf16();
  REQUIRE(bf16.size() == fp32.size());
  for (std::size_t i = 0; i < fp32.size(); ++i) {
    CAPTURE(fp32[i].name);
    CHECK(finite(bf16[i].y));
    CHECK(finite(bf16[i].grads));
    CHECK(bf16[i].y != fp32[i].y);  // the rounding takes effect
    moe::gpu_test::expect_close(bf16[i].y, fp32[i].y, 2e-2, "y");
  }
  using moe::gpu_test::round_to_bf16;            // bf16 keeps 7 fraction bits: 1 + 2^-7 follows 1
  CHECK(round_to_bf16(1.0f + 0x1p-9f) == 1.0f);  // below half: down
  CHECK(round_to_bf16(1.0f + 0x1p-8f) == 1.0f);  // a tie: to even
  CHECK(round_to_bf16(1.0f + 3 * 0x1p-8f) == 1.0f + 0x1p-6f);         // a tie: to even
  CHECK(round_to_bf16(1.0f + 0x1p-8f + 0x1p-10f) == 1.0f + 0x1p-7f);  // above half: up
}

namespace {
// Serial and concurrent outputs of serial_and_concurrent_eval: equal, bitwise.
void check_concurrent(const std::vector<std::vector<float>>& out) {
  const std::size_t batches = out.size() / 2;
  for (std::size_t b = 0; b < batches; ++b) {
    CAPTURE(b);
    CHECK(!out[b].empty());
    CHECK(nonzero(out[b]));
    CHECK(out[batches + b] == out[b]);
  }
}
}  // namespace

TEST_CASE("the CPU reference of concurrent eval forwards: four threads, one layer") {
  check_concurrent(moe::gpu_test::serial_and_concurrent_eval(moe::cpu::Backend<float>(2)));
}

TEST_CASE("the CUDA backend serves concurrent eval forwards on one layer, bitwise as serial") {
  check_concurrent(moe::gpu_test::serial_and_concurrent_eval_on_cuda(false));
  check_concurrent(moe::gpu_test::serial_and_concurrent_eval_on_cuda(true));
}

TEST_CASE("the CUDA backend (fp32 experts) matches the CPU backend to 1e-5") {
  moe::gpu_test::compare(moe::gpu_test::run_on_cuda(false), run_on_cpu(), 1e-5);
}

TEST_CASE(
    "the CUDA backend (bf16 experts, fp32 accumulation) matches the CPU backend with bf16-rounded "
    "expert operands to 1e-2") {
  moe::gpu_test::compare(moe::gpu_test::run_on_cuda(true), run_on_cpu_bf16(), 1e-2);
}

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) reference_only |= std::strcmp(argv[i], "--reference-only") == 0;
  if (!reference_only && moe::gpu_test::cuda_devices() == 0) {
    std::puts("test_cuda: no CUDA device found: skipped (exit 77, CTest SKIP_RETURN_CODE)");
    return 77;
  }
  doctest::Context context;
  context.applyCommandLine(argc, argv);
  if (reference_only) context.addFilter("test-case", "the CPU reference*");
  return context.run();
}
