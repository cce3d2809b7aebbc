// Benchmarks of moe::Layer on the CPU backend (float), each row measured
// against a yardstick timed in the same process (bench/reference.hpp):
//   MoE/...      T = 4096 training batches against the dense GEMM of the same
//                expert-GEMM FLOPs: ratio_vs_dense_gemm = dense time / MoE time.
//   Decode/...   T in {1, 4, 16}, eval forwards through a stack of layers whose
//                weights do not fit in the cache, against the copy bandwidth.
//   Memory/copy  the copy bandwidth itself.
// Names: MoE/E<E>k<k>/d_ff<d_ff>/<activation>/<fwd|fwd+bwd>/<router>/<estimator>,
// Decode/T<T>/E8k2/d_ff1024/GELU/eval/TopK/Sparse. bench/README.md explains
// how FLOPs and bytes are counted. `--quick` (smoke tests only) runs every row
// once with one reference repetition.

#include <benchmark/benchmark.h>
#if __has_include(<unistd.h>)
#include <unistd.h>  // sysconf: the L3 size
#endif

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "moe/backend/cpu/memory.hpp"  // HugePageResource: the second copy row
#include "moe/moe.hpp"
#include "reference.hpp"

namespace {

using bench::Clock;
using bench::Index;
using bench::RowMat;
using Backend = moe::cpu::Backend<float>;
using moe::cpu::Gemm;

constexpr Index kTokens = 4096, kModel = 512;

// Fixed iteration counts: the whole suite stays within a few minutes on 2
// cores (bench/README.md has the estimate).
constexpr int kItersForward = 10, kItersForwardBackward = 6;
constexpr int kItersDecode = 50, kItersCopy = 20;
constexpr int kReferenceReps = 5;  // timed repetitions of a yardstick (the fastest counts)
bool g_quick = false;              // --quick: 1 iteration, 1 repetition

int iterations(int n) { return g_quick ? 1 : n; }
int reference_reps() { return g_quick ? 1 : kReferenceReps; }

// ---------------------------------------------------------------------------
// What a row is: shape, pass, names.

struct Shape {
  Index experts;
  int k;
  Index d_ff;

  moe::LayerConfig config() const { return {.d_model = kModel, .d_ff = d_ff, .experts = experts}; }
  // "E8k2/d_ff1024", by appends: GCC 12 warns (-Wrestrict, a false positive)
  // on "E" + std::to_string(...).
  std::string name() const {
    std::string s = "E";
    s += std::to_string(experts);
    s += "k";
    s += std::to_string(k);
    s += "/d_ff";
    s += std::to_string(d_ff);
    return s;
  }
};

enum class Pass { forward, forward_backward };

const char* pass_name(Pass pass) { return pass == Pass::forward ? "fwd" : "fwd+bwd"; }

template <class Act>
const char* act_name() {
  if constexpr (std::is_same_v<Act, moe::act::GELU>) {
    return "GELU";
  } else if constexpr (std::is_same_v<Act, moe::act::SwiGLU>) {
    return "SwiGLU";
  } else {
    static_assert(std::is_same_v<Act, moe::act::ReLU>, "name the activation here");
    return "ReLU";
  }
}

// ---------------------------------------------------------------------------
// Counting.

// Expert-GEMM FLOPs of one row (one token through one expert) in a forward:
// GEMM1 d x (w d_ff), w = 2 for SwiGLU's [W1 | W3], and GEMM2 d_ff x d, at 2
// FLOPs per multiply-add. The backward runs two GEMMs of the same size per
// forward GEMM, so forward+backward is 3x. Router, gather, activation and
// combine are timed but not counted.
double flops_per_row(const moe::LayerConfig& c, Index w) {
  return 2.0 * static_cast<double>(c.d_model * w * c.d_ff) +
         2.0 * static_cast<double>(c.d_ff * c.d_model);
}

// Bytes of one expert's weights (and biases, if any), float.
double expert_bytes(const moe::LayerConfig& c, Index w) {
  const Index biases = c.expert_bias ? c.d_ff + c.d_model : 0;
  return 4.0 * static_cast<double>(c.d_model * w * c.d_ff + c.d_ff * c.d_model + biases);
}

double routed_rows(const moe::RoutingStats& stats) {
  double rows = 0;
  for (Index n : stats.tokens_per_expert) rows += static_cast<double>(n);
  return rows;
}

// The busiest expert's routed rows over the mean.
double max_load(const moe::RoutingStats& stats) {
  const auto& load = stats.tokens_per_expert;
  const double mean = routed_rows(stats) / static_cast<double>(load.size());
  return mean > 0 ? static_cast<double>(*std::max_element(load.begin(), load.end())) / mean : 0;
}

// Rows the experts computed: the routed pairs, or T E for an estimator that
// computes every expert (DenseExact, the oracle; its stats report the routed
// load only). Its backward runs the grouped GEMMs over the same rows.
template <class Layer>
double computed_rows(const Layer& layer, const typename Layer::Cache& cache) {
  using Estimator = std::remove_cvref_t<decltype(layer.estimator())>;
  if constexpr (Estimator::kComputesAllExperts) {
    return static_cast<double>(cache.tokens() * layer.config().experts);
  } else {
    return routed_rows(cache.stats());
  }
}

// ---------------------------------------------------------------------------
// MoE rows: one layer, T = 4096, Mode::train, against the dense reference.

// ACMoE clusters by the previous MoE layer's top-1 experts: give it a fixed
// random assignment, as every layer but the first gets. Others get none.
template <class Router>
std::vector<int> previous_assignment(Index experts) {
  std::vector<int> assignment;
  if constexpr (std::is_same_v<Router, moe::router::AdaptiveCluster>) {
    std::mt19937 rng(7);
    std::uniform_int_distribution<int> pick(0, static_cast<int>(experts) - 1);
    for (Index t = 0; t < kTokens; ++t) assignment.push_back(pick(rng));
  }
  return assignment;
}

template <class Layer>
void bench_moe(benchmark::State& state, Layer& layer, Pass pass,
               const moe::ForwardContext& context) {
  const moe::LayerConfig& c = layer.config();
  const bool backward = pass == Pass::forward_backward;
  RowMat x(kTokens, kModel), dy(kTokens, kModel), y(kTokens, kModel), dx(kTokens, kModel);
  bench::fill_random(x, 11);
  bench::fill_random(dy, 12);
  auto grads = layer.make_gradients();  // accumulates across iterations, never re-zeroed
  typename Layer::Cache cache;
  auto step = [&] {
    layer.forward(x, y, cache, moe::Mode::train, context);
    if (backward) layer.backward(x, cache, dy, dx, grads);
    benchmark::DoNotOptimize(y.data());
    benchmark::DoNotOptimize(dx.data());
    benchmark::ClobberMemory();
  };
  step();  // warm-up: sizes the cache and workspaces; the routing it reports
           // stays the same (no optimiser step), so the FLOPs count holds

  const double rows = computed_rows(layer, cache);
  const double flops = (backward ? 3.0 : 1.0) * rows * flops_per_row(c, Layer::kInputWidth);

  // The dense GEMMs of the same FLOPs, right before the MoE loop, so that both
  // see the same machine state. Its hidden width is rounded to whole units
  // (ReluL1's rows per token are not whole): the ratio compares FLOP rates.
  const auto hidden = static_cast<Index>(
      std::llround(rows / static_cast<double>(kTokens) * static_cast<double>(c.d_ff)));
  double dense_gflops = 0;
  {
    bench::DenseReference dense(kTokens, c.d_model, hidden, Layer::kInputWidth, backward);
    dense_gflops = dense.flops() / dense.best_seconds(reference_reps()) / 1e9;
  }

  const auto t0 = Clock::now();
  for (auto _ : state) step();
  const double moe_s = bench::seconds_since(t0) / static_cast<double>(state.iterations());

  const double gflops = flops / moe_s / 1e9;
  state.counters["ratio_vs_dense_gemm"] = gflops / dense_gflops;  // = dense time / MoE time
  state.counters["GFLOP/s"] = gflops;
  state.counters["dense_GFLOP/s"] = dense_gflops;
  state.counters["tokens/s"] = static_cast<double>(kTokens) / moe_s;
  state.counters["experts/token"] = rows / static_cast<double>(kTokens);
  state.counters["max_load"] = max_load(cache.stats());
}

struct RowOptions {
  int iterations = 0;  // 0: by pass
  Gemm gemm = Gemm::automatic;
  const char* suffix = "";  // appended to the name
};

template <class Act, class Router, class Estimator>
void add_moe(const Shape& shape, Pass pass, const std::string& router_name, Router router,
             const std::string& estimator_name, Estimator estimator, RowOptions options = {}) {
  const std::string name = "MoE/" + shape.name() + "/" + act_name<Act>() + "/" + pass_name(pass) +
                           "/" + router_name + "/" + estimator_name + options.suffix;
  const int iters = options.iterations > 0  ? options.iterations
                    : pass == Pass::forward ? kItersForward
                                            : kItersForwardBackward;
  benchmark::RegisterBenchmark(
      name.c_str(),
      [=](benchmark::State& state) {
        using Layer = moe::Layer<Router, Estimator, Backend, Act>;
        Layer layer(shape.config(), router, estimator, /*seed=*/42, Backend(0, options.gemm));
        const std::vector<int> assignment = previous_assignment<Router>(shape.experts);
        bench_moe(state, layer, pass, {.previous_assignment = assignment});
      })
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond)
      ->Iterations(iterations(iters));
}

// The forward row, then the forward+backward row.
template <class Act, class Router, class Estimator>
void add_moe_passes(const Shape& shape, const std::string& router_name, Router router,
                    const std::string& estimator_name, Estimator estimator,
                    RowOptions options = {}) {
  for (Pass pass : {Pass::forward, Pass::forward_backward})
    add_moe<Act>(shape, pass, router_name, router, estimator_name, estimator, options);
}

// ---------------------------------------------------------------------------
// Decode rows: T in {1, 4, 16}, Mode::eval, against the copy bandwidth.

using DecodeLayer = moe::Layer<moe::router::TopK, moe::estimator::Sparse, Backend, moe::act::GELU>;
constexpr Shape kDecodeShape{8, 2, 1024};
// The weights of the stack must come from DRAM, not from the last-level
// cache: at least 16 layers x 32 MiB = 512 MiB, and 8x the L3 where the L3 is
// larger, so that even T = 1, which reads 2 of each layer's 8 experts (a
// quarter of the stack), reads twice the L3 per iteration. The copy buffers
// are likewise at least twice the L3 each.
std::size_t last_level_cache_bytes() {
#if defined(_SC_LEVEL3_CACHE_SIZE)
  const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
  if (l3 > 0) return static_cast<std::size_t>(l3);
#endif
  return std::size_t{32} << 20;
}
std::size_t decode_layers() {
  const double layer_bytes = static_cast<double>(kDecodeShape.experts) *
                             expert_bytes(kDecodeShape.config(), DecodeLayer::kInputWidth);
  const double wanted = 8.0 * static_cast<double>(last_level_cache_bytes()) / layer_bytes;
  return std::max<std::size_t>(16, static_cast<std::size_t>(std::ceil(wanted)));
}
std::size_t copy_bytes() { return std::max(std::size_t{512} << 20, 2 * last_level_cache_bytes()); }

// Built on first use (about a second) and kept for every T.
std::vector<std::unique_ptr<DecodeLayer>>& decode_stack() {
  static std::vector<std::unique_ptr<DecodeLayer>> layers = [] {
    std::vector<std::unique_ptr<DecodeLayer>> built;
    const std::size_t count = decode_layers();
    for (std::size_t l = 0; l < count; ++l)
      built.push_back(std::make_unique<DecodeLayer>(
          kDecodeShape.config(), moe::router::TopK{.k = kDecodeShape.k}, moe::estimator::Sparse{},
          /*seed=*/100 + static_cast<std::uint64_t>(l)));
    return built;
  }();
  return layers;
}

bench::CopyBandwidth& copy_bandwidth() {
  static bench::CopyBandwidth copy(copy_bytes());
  return copy;
}

void bench_decode(benchmark::State& state, Index tokens) {
  auto& layers = decode_stack();
  const std::size_t L = layers.size();
  const moe::LayerConfig& c = layers.front()->config();
  constexpr Index w = DecodeLayer::kInputWidth;
  // Each layer gets its own fixed input, so its routing is fixed.
  std::vector<RowMat> xs(L, RowMat(tokens, kModel)), ys(L, RowMat(tokens, kModel));
  std::vector<DecodeLayer::Cache> caches(L);
  for (std::size_t l = 0; l < L; ++l) bench::fill_random(xs[l], 1000 + l);
  auto step = [&] {
    for (std::size_t l = 0; l < L; ++l) {
      layers[l]->forward(xs[l], ys[l], caches[l], moe::Mode::eval);
      benchmark::DoNotOptimize(ys[l].data());
    }
    benchmark::ClobberMemory();
  };
  step();  // warm-up: sizes the caches and gives the routing

  // Weight bytes one iteration must read: each layer's distinct routed
  // experts (the router's E x d weights, 16 KiB a layer, are not counted).
  double experts_read = 0, rows = 0, load = 0;
  for (const auto& cache : caches) {
    const auto& per_expert = cache.stats().tokens_per_expert;
    experts_read += static_cast<double>(
        std::count_if(per_expert.begin(), per_expert.end(), [](Index n) { return n > 0; }));
    rows += routed_rows(cache.stats());
    load += max_load(cache.stats());
  }
  const double bytes = experts_read * expert_bytes(c, w);

  // The copy bandwidth right before the loop (it also evicts the weights).
  const double copy_gbps = copy_bandwidth().best_gbps(reference_reps());

  const auto t0 = Clock::now();
  for (auto _ : state) step();
  const double s = bench::seconds_since(t0) / static_cast<double>(state.iterations());

  const double layers_d = static_cast<double>(L);
  state.counters["GB/s"] = bytes / s / 1e9;
  state.counters["fraction_of_copy_bw"] = bytes / s / 1e9 / copy_gbps;
  state.counters["copy_GB/s"] = copy_gbps;
  state.counters["us/layer"] = s / layers_d * 1e6;
  state.counters["tokens/s"] = static_cast<double>(tokens) * layers_d / s;  // per layer
  state.counters["GFLOP/s"] = rows * flops_per_row(c, w) / s / 1e9;
  state.counters["experts_read"] = experts_read / layers_d;  // per layer
  state.counters["max_load"] = load / layers_d;              // mean over layers
}

void add_decode(Index tokens) {
  const std::string name =
      "Decode/T" + std::to_string(tokens) + "/" + kDecodeShape.name() + "/GELU/eval/TopK/Sparse";
  benchmark::RegisterBenchmark(name.c_str(),
                               [tokens](benchmark::State& state) { bench_decode(state, tokens); })
      ->UseRealTime()
      ->Unit(benchmark::kMicrosecond)
      ->Iterations(iterations(kItersDecode));
}

void bench_copy(benchmark::State& state, bench::CopyBandwidth& copy) {
  copy.run();  // warm-up
  const auto t0 = Clock::now();
  for (auto _ : state) copy.run();
  const double s = bench::seconds_since(t0) / static_cast<double>(state.iterations());
  state.counters["GB/s"] = copy.bytes_moved() / s / 1e9;  // read + written
}

// ---------------------------------------------------------------------------

void register_all() {
  using moe::act::GELU;
  using moe::act::SwiGLU;
  namespace router = moe::router;
  namespace estimator = moe::estimator;

  // 1. The main shape: E = 8, d_ff = 1024, k = 1 and 2, GELU and SwiGLU.
  for (int k : {1, 2})
    add_moe_passes<GELU>({8, k, 1024}, "TopK", router::TopK{.k = k}, "Sparse", estimator::Sparse{});
  for (int k : {1, 2})
    add_moe_passes<SwiGLU>({8, k, 1024}, "TopK", router::TopK{.k = k}, "Sparse",
                           estimator::Sparse{});

  // 2. Fine-grained experts: E = 32, k = 4, d_ff = 256 and 1024.
  for (Index d_ff : {256, 1024})
    add_moe_passes<GELU>({32, 4, d_ff}, "TopK", router::TopK{.k = 4}, "Sparse",
                         estimator::Sparse{});

  // 3. Every router (with Sparse) and every estimator (with TopK) at E8k2
  // GELU; TopK/Sparse is the row of section 1.
  const Shape base{8, 2, 1024};
  // ReMoE: k = 2 only sets lambda's sparsity target. At initialisation (lambda
  // untrained) about half the logits are positive, so it computes about 4
  // experts per token: experts/token shows it, and the FLOPs count it.
  const auto controller = std::make_shared<router::LambdaController>(
      router::LambdaController::for_experts(base.k, static_cast<int>(base.experts)));
  add_moe_passes<GELU>(base, "ReluL1", router::ReluL1{.controller = controller, .k = base.k},
                       "Sparse", estimator::Sparse{});
  add_moe_passes<GELU>(base, "AdaptiveCluster", router::AdaptiveCluster{.k = base.k}, "Sparse",
                       estimator::Sparse{});
  // SMoE-Dropout's frozen random router, with a constant k = 2 schedule.
  add_moe_passes<GELU>(base, "RandomFrozen",
                       router::random_frozen(router::schedule::Constant{.k = base.k}), "Sparse",
                       estimator::Sparse{});
  add_moe_passes<GELU>(base, "TopK", router::TopK{.k = base.k}, "DefaultEMA",
                       estimator::DefaultEMA{});
  // The oracle computes all E experts for every token (4x the work of k = 2):
  // its FLOPs count all of them (experts/token = E). Fewer iterations.
  add_moe_passes<GELU>(base, "TopK", router::TopK{.k = base.k}, "DenseExact-oracle",
                       estimator::DenseExact{}, {.iterations = 3});

  // 4. With a BLAS, the same layer on Eigen's GEMM: what the BLAS path gains.
  if (Backend().gemm_engine() == Gemm::blas)
    add_moe<GELU>(base, Pass::forward_backward, "TopK", router::TopK{.k = base.k}, "Sparse",
                  estimator::Sparse{}, {.gemm = Gemm::eigen, .suffix = "/eigen-gemm"});

  // 5. With oneDNN, the bf16 engine (operands in bf16, fp32 sums) at E8k2
  // and E32k4: ratio_vs_dense_gemm stays against the fp32 dense GEMM, so it
  // shows the gain over fp32 directly.
  // The fp32 oneDNN engine (the weights packed once per call) on the same
  // shapes: against the fp32 layer on the BLAS, the packing it saves.
  if constexpr (moe::cpu::onednn::kAvailable) {
    for (const RowOptions engine :
         {RowOptions{.gemm = Gemm::onednn_bf16, .suffix = "/bf16"},
          RowOptions{.gemm = Gemm::onednn_f32, .suffix = "/onednn_f32"}}) {
      add_moe_passes<GELU>(base, "TopK", router::TopK{.k = base.k}, "Sparse", estimator::Sparse{},
                           engine);
      add_moe_passes<SwiGLU>(base, "TopK", router::TopK{.k = base.k}, "Sparse", estimator::Sparse{},
                             engine);
      add_moe_passes<GELU>({32, 4, 256}, "TopK", router::TopK{.k = 4}, "Sparse",
                           estimator::Sparse{}, engine);
    }
  }

  // 6. The copy bandwidth, then decode batches against it.
  benchmark::RegisterBenchmark("Memory/copy",
                               [](benchmark::State& state) { bench_copy(state, copy_bandwidth()); })
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond)
      ->Iterations(iterations(kItersCopy));
  // The same copy between buffers on huge pages, where the layer keeps its
  // weights (moe::cpu::HugePageResource): a second yardstick, for reference.
  // Built on first use and kept, as the other copy's buffers.
  benchmark::RegisterBenchmark("Memory/copy/huge_pages",
                               [](benchmark::State& state) {
                                 static bench::CopyBandwidth copy(
                                     copy_bytes(), moe::cpu::HugePageResource::instance());
                                 bench_copy(state, copy);
                               })
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond)
      ->Iterations(iterations(kItersCopy));
  for (Index tokens : {1, 4, 16}) add_decode(tokens);
}

void add_context() {
  benchmark::AddCustomContext("omp_max_threads", std::to_string(bench::max_threads()));
  benchmark::AddCustomContext("eigen_simd", Eigen::SimdInstructionSetsInUse());
  benchmark::AddCustomContext("eigen_threads", std::to_string(Eigen::nbThreads()));
  benchmark::AddCustomContext("blas", moe::cpu::blas_info());
  benchmark::AddCustomContext("gemm_engine", moe::cpu::to_string(Backend().gemm_engine()));
  benchmark::AddCustomContext("dense_reference", std::string(bench::dense_gemm_name()) + ", " +
                                                     std::to_string(bench::max_threads()) +
                                                     " threads");
  const char* coretype = std::getenv("OPENBLAS_CORETYPE");
  benchmark::AddCustomContext("OPENBLAS_CORETYPE",
                              coretype ? std::string(coretype) + " (forces the kernel)" : "unset");
  benchmark::AddCustomContext("shape", "T=" + std::to_string(kTokens) +
                                           " d_model=" + std::to_string(kModel) +
                                           ", float, dropless, Mode::train (Decode: eval)");
  const double stack_mib =
      static_cast<double>(decode_layers()) * static_cast<double>(kDecodeShape.experts) *
      expert_bytes(kDecodeShape.config(), DecodeLayer::kInputWidth) / (1 << 20);
  benchmark::AddCustomContext("decode_stack", std::to_string(decode_layers()) + " layers, " +
                                                  std::to_string(std::lround(stack_mib)) +
                                                  " MiB of expert weights");
  benchmark::AddCustomContext("copy_buffers",
                              std::to_string(copy_bytes() >> 20) + " MiB each; L3 " +
                                  std::to_string(last_level_cache_bytes() >> 20) + " MiB");
  if (g_quick)
    benchmark::AddCustomContext("quick", "1 iteration per row: smoke test, not a measurement");
}

}  // namespace

int main(int argc, char** argv) {
  // --quick is ours; Google Benchmark must not see it.
  int kept = 1;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) {
      g_quick = true;
    } else {
      argv[kept++] = argv[i];
    }
  }
  argc = kept;
  add_context();
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
