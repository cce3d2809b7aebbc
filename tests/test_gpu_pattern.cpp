// The layer on the CPU backend called the way the CUDA backend calls it:
// parallel_for_rows one column at a time, parallel_sum_rows as a warp's 32
// lane sums and shuffle tree, and every loop in reverse order. A loop body of
// the layer or a policy that is not column-independent, or that depends on
// the order of items, gives other results here than on the plain CPU backend.
// So this checks, on every machine and under the sanitizers, what the GPU's
// call pattern relies on; the GPU suite (tests/cuda) then compares the GPU
// itself where one exists.

#include <doctest/doctest.h>

#include <type_traits>

#include "cuda/compare.hpp"
#include "moe/moe.hpp"

namespace {

class GpuPatternBackend : public moe::cpu::Backend<float> {
 public:
  static constexpr const char* kName = "cpu_gpu_pattern";
  GpuPatternBackend() : moe::cpu::Backend<float>(1) {}

  template <class F>
  void parallel_for(moe::Index n, F&& f, moe::Index /*work*/ = 0) const {
    for (moe::Index i = n - 1; i >= 0; --i) f(i);
  }

  template <class F>
  void parallel_for_rows(moe::Index rows, moe::Index cols, F&& f, moe::Index /*work*/ = 0) const {
    for (moe::Index r = rows - 1; r >= 0; --r)
      for (moe::Index c = cols - 1; c >= 0; --c) f(r, c, c + 1);
  }

  template <class Term, class Store>
  void parallel_sum_rows(moe::Index n, moe::Index len, Term&& term, Store&& store,
                         moe::Index /*work*/ = 0) const {
    using Sum = std::decay_t<decltype(term(moe::Index{}, moe::Index{}))>;
    constexpr int kWarp = 32;
    for (moe::Index i = n - 1; i >= 0; --i) {
      Sum lane[kWarp] = {};
      for (int l = 0; l < kWarp; ++l)
        for (moe::Index j = l; j < len; j += kWarp) lane[l] += term(i, j);
      for (int offset = kWarp / 2; offset > 0; offset /= 2)  // __shfl_down_sync's tree
        for (int l = 0; l < offset; ++l) lane[l] += lane[l + offset];
      store(i, lane[0]);
    }
  }
};
static_assert(moe::BackendPolicy<GpuPatternBackend>);

}  // namespace

TEST_CASE("every case under the GPU's call pattern matches the CPU backend to 1e-5") {
  const auto pattern = moe::gpu_test::run_cases(GpuPatternBackend());
  const auto cpu = moe::gpu_test::run_cases(moe::cpu::Backend<float>(1));
  REQUIRE(cpu.size() == 16);
  moe::gpu_test::compare(pattern, cpu, 1e-5);
}

TEST_CASE("the call-pattern check can fail: a loop body reading a neighbouring column") {
  // The pattern backend must tell a column-independent body from one that is
  // not: a prefix sum over a row is right on whole rows only.
  const GpuPatternBackend pattern;
  const moe::cpu::Backend<float> cpu(1);
  const auto prefix = [](const auto& be) {
    std::vector<float> v(12, 1.0f);
    float* p = v.data();
    be.parallel_for_rows(
        3, 4,
        [=](moe::Index r, moe::Index begin, moe::Index end) {
          for (moe::Index j = std::max<moe::Index>(begin, 1); j < end; ++j)
            p[r * 4 + j] += p[r * 4 + j - 1];
        },
        12);
    return v;
  };
  CHECK(prefix(cpu) != prefix(pattern));
}
