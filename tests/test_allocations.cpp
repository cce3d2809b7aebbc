// Steady-state training steps allocate nothing: after a warm-up step has sized
// the cache, the layer's workspace and the backend's tile plan, a forward +
// backward + end_step makes no heap allocation, for every router x estimator,
// 1 and 2 threads, and a batch with another routing.
//
// The BLAS engine (the default where a BLAS is found) is checked at a size
// where every product goes to the BLAS. Eigen's GEMM allocates its own packing
// buffers for each product it runs above the stack limit (Eigen's internals,
// not ours), so the Eigen engine is checked where its products stay small
// (decode-size batches): there the layer's and the backend's own code shows.
//
// Counted at the C allocator (malloc, calloc, realloc, posix_memalign,
// aligned_alloc, memalign), which operator new, Eigen, OpenBLAS and the
// OpenMP runtime all use. The hooks replace glibc's symbols in this program
// only; sanitizer builds interpose the allocator themselves and skip this test.

#include <malloc.h>

#include <atomic>
#include <cstdlib>

#include "support.hpp"

extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
}

namespace {
std::atomic<long> g_allocations{0};
std::atomic<bool> g_counting{false};
void count() {
  if (g_counting.load(std::memory_order_relaxed))
    g_allocations.fetch_add(1, std::memory_order_relaxed);
}
}  // namespace

extern "C" {
void* malloc(std::size_t n) {
  count();
  return __libc_malloc(n);
}
void* calloc(std::size_t n, std::size_t size) {
  count();
  return __libc_calloc(n, size);
}
void* realloc(void* p, std::size_t n) {
  count();
  return __libc_realloc(p, n);
}
void* memalign(std::size_t alignment, std::size_t n) {
  count();
  return __libc_memalign(alignment, n);
}
void* aligned_alloc(std::size_t alignment, std::size_t n) {
  count();
  return __libc_memalign(alignment, n);
}
int posix_memalign(void** out, std::size_t alignment, std::size_t n) {
  count();
  void* p = __libc_memalign(alignment, n);
  if (p == nullptr) return ENOMEM;
  *out = p;
  return 0;
}
}

using namespace moe;
using namespace moe::test;
namespace sched = moe::router::schedule;

namespace {

// Allocations made by f() (on any thread).
template <class F>
long allocations_in(F&& f) {
  g_allocations = 0;
  g_counting = true;
  f();
  g_counting = false;
  return g_allocations.load();
}

template <class Router, class Estimator, class Act = act::GELU>
void check_steady_state(const Router& router, const Estimator& estimator, cpu::Gemm engine,
                        int threads,
                        LayerConfig config = {.d_model = 48, .d_ff = 96, .experts = 8}) {
  using L = Layer<Router, Estimator, cpu::Backend<float>, Act>;
  L layer(config, router, estimator, 7, cpu::Backend<float>(threads, engine));
  // BLAS: enough tokens for BLAS-sized tiles and parallel loops. Eigen: few
  // enough that every expert stays within the skinny kernel.
  const Index T = engine == cpu::Gemm::blas ? 1500 : 3, d = config.d_model;
  const auto x = random_matrix<float>(T, d, 1), dy = random_matrix<float>(T, d, 2);
  const auto other_x = random_matrix<float>(T, d, 3);  // another routing, same shape
  Mat<float> y(T, d), dx(T, d);
  auto grads = layer.make_gradients();
  typename L::Cache cache;
  std::uint64_t step = 0;
  auto train_step = [&](const Mat<float>& input) {
    layer.forward(input, y, cache, Mode::train);
    layer.backward(input, cache, dy, dx, grads);
    layer.end_step(++step);
  };
  // Warm-up: both batches, so buffers have the larger routing's size.
  train_step(x);
  train_step(other_x);
  train_step(x);
  const std::string router_name = Router::kName, estimator_name = Estimator::kName;
  const std::string engine_name = cpu::to_string(engine);
  CAPTURE(router_name);
  CAPTURE(estimator_name);
  CAPTURE(engine_name);
  CAPTURE(threads);
  CAPTURE(T);
  CHECK(allocations_in([&] {
          for (int i = 0; i < 3; ++i) train_step(i % 2 ? other_x : x);
        }) == 0);
  // Eval forwards (inference) too.
  CHECK(allocations_in([&] { layer.forward(x, y, cache, Mode::eval); }) == 0);
}

}  // namespace

TEST_CASE("the counting hooks see allocations") {
  CHECK(allocations_in([] {
          std::vector<int> v(1000);
          v[3] = 1;
          CHECK(v[3] == 1);
        }) >= 1);
  CHECK(allocations_in([] {
          void* p = std::malloc(64);
          std::free(p);
        }) == 1);
}

TEST_CASE("a steady-state training step allocates nothing, for every router and estimator") {
  for (const cpu::Gemm engine : gemm_engines())
    for (const int threads : {1, 2}) {
      check_steady_state(router::TopK{.k = 2}, estimator::Sparse{}, engine, threads);
      check_steady_state(router::TopK{.k = 2}, estimator::DefaultEMA{}, engine, threads);
      check_steady_state(router::TopK{.k = 2}, estimator::DenseExact{}, engine, threads);
      check_steady_state(
          router::ReluL1{.controller = std::make_shared<router::LambdaController>(
                             router::LambdaController::Options{.target_sparsity = 0.75}),
                         .k = 2},
          estimator::Sparse{}, engine, threads);
      check_steady_state(router::AdaptiveCluster{.k = 2}, estimator::Sparse{}, engine, threads);
      check_steady_state(router::random_frozen(sched::Constant{2}), estimator::Sparse{}, engine,
                         threads);
      // SwiGLU, expert biases with ReLU, dropout and a capacity limit.
      check_steady_state<router::TopK, estimator::Sparse, act::SwiGLU>(router::TopK{.k = 2}, {},
                                                                       engine, threads);
      // d_ff above the split depth: decode-size forwards (Eigen's 3 tokens)
      // split the second product over k, into the thread's partial sums.
      check_steady_state(router::TopK{.k = 2}, estimator::Sparse{}, engine, threads,
                         {.d_model = 48, .d_ff = 320, .experts = 8});
      check_steady_state<router::TopK, estimator::Sparse, act::ReLU>(router::TopK{.k = 1}, {},
                                                                     engine, threads,
                                                                     {.d_model = 48,
                                                                      .d_ff = 96,
                                                                      .experts = 8,
                                                                      .expert_bias = true,
                                                                      .dropout = 0.1,
                                                                      .capacity_factor = 1.1});
    }
}
