// Expert parallelism over MPI: one training step (forward + backward +
// sum_replicated_gradients) of a layer whose experts are sharded over the P
// processes of mpirun, on a global batch of T = 4096 tokens (T / P each),
// beside the same layer with every expert in one process (dispatch::Local)
// on the whole batch, timed in the same run. Run under mpirun with P = 1, 2:
//
//   mpirun -np P moe_bench_expert_parallel --benchmark_counters_tabular=true
//
// Counters (rank 0 prints; every process runs the same fixed iterations):
//   tokens_per_s     global tokens per second
//   MB_sent          MB of rows each process sends to the others per step
//                    (forward and backward, both ways), rank 0's
//   MB_received      the same, received
// Rows: EP/E<E>k<k>/d_ff<d_ff>/P<P>/<estimator> and Local/... (P = 1 only:
// the whole batch in one process, the single-process yardstick).

#include <benchmark/benchmark.h>
#include <mpi.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "moe/moe.hpp"
#include "moe/mpi.hpp"

namespace {

using Backend = moe::cpu::Backend<float>;
constexpr moe::Index kTokens = 4096, kModel = 512;
constexpr int kIterations = 6;
bool g_quick = false;

struct Shape {
  moe::Index experts;
  int k;
  moe::Index d_ff;
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

std::vector<float> random_values(moe::Index n, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.f, 1.f);
  std::vector<float> v(static_cast<std::size_t>(n));
  for (auto& x : v) x = dist(gen);
  return v;
}

int rank_of(MPI_Comm comm) {
  int r = 0;
  MPI_Comm_rank(comm, &r);
  return r;
}
int size_of(MPI_Comm comm) {
  int p = 1;
  MPI_Comm_size(comm, &p);
  return p;
}

// One training step per iteration: this process's T / P tokens (all T for
// the Local row), forward, backward and the replicated gradients' sum.
template <class Estimator, class Dispatcher>
void train_step(benchmark::State& state, Shape shape, Dispatcher dispatcher, moe::Index tokens) {
  using Layer = moe::Layer<moe::router::TopK, Estimator, Backend, moe::act::GELU, Dispatcher>;
  Layer layer({.d_model = kModel, .d_ff = shape.d_ff, .experts = shape.experts},
              moe::router::TopK{.k = shape.k}, {}, 7, Backend{}, dispatcher);
  const auto& group = layer.dispatcher().group();
  // This process's rows of one global batch.
  const moe::Index first = kTokens * group.rank() / group.size();
  const auto all = random_values(kTokens * kModel, 1);
  const std::vector<float> x(all.begin() + first * kModel, all.begin() + (first + tokens) * kModel);
  const auto dy = random_values(tokens * kModel, 2 + static_cast<std::uint32_t>(group.rank()));
  std::vector<float> y(x.size()), dx(x.size());
  auto grads = layer.make_gradients();
  typename Layer::Cache cache;
  const moe::ConstMatrixView<float> xv(x.data(), tokens, kModel), dyv(dy.data(), tokens, kModel);
  const moe::MatrixView<float> yv(y.data(), tokens, kModel), dxv(dx.data(), tokens, kModel);
  auto step = [&] {
    layer.forward(xv, yv, cache, moe::Mode::train);
    layer.backward(xv, cache, dyv, dxv, grads);
    moe::sum_replicated_gradients(layer, grads);
  };
  step();  // warm-up: buffers sized
  for (auto _ : state) step();
  state.counters["tokens_per_s"] = benchmark::Counter(
      static_cast<double>(kTokens), benchmark::Counter::kIsIterationInvariantRate);
  if constexpr (!std::is_same_v<Dispatcher, moe::dispatch::Local>) {
    // Rows to and from other processes, d_model floats each, four times a
    // step (forward out and back, backward out and back).
    const auto& d = cache.dispatch_cache();
    double sent = 0, received = 0;
    for (int r = 0; r < group.size(); ++r) {
      if (r == group.rank()) continue;
      sent += d.sent_rows()[static_cast<std::size_t>(r)];
      received += d.received_rows()[static_cast<std::size_t>(r)];
    }
    const double row_bytes = 4.0 * kModel * sizeof(float) / 1e6;
    state.counters["MB_sent"] = sent * row_bytes;
    state.counters["MB_received"] = received * row_bytes;
  }
}

template <class Estimator>
void register_shape(Shape shape, const char* estimator) {
  const int P = size_of(MPI_COMM_WORLD);
  const std::string tail = shape.name() + "/P" + std::to_string(P) + "/" + estimator;
  const int iters = g_quick ? 1 : kIterations;
  benchmark::RegisterBenchmark(("EP/" + tail).c_str(),
                               [shape, P](benchmark::State& s) {
                                 const moe::Index r = rank_of(MPI_COMM_WORLD);
                                 const moe::Index tokens = kTokens * (r + 1) / P - kTokens * r / P;
                                 train_step<Estimator>(
                                     s, shape, moe::mpi::ExpertParallel(MPI_COMM_WORLD), tokens);
                               })
      ->Iterations(iters)
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond);
  if (P == 1)
    benchmark::RegisterBenchmark(("Local/" + tail).c_str(),
                                 [shape](benchmark::State& s) {
                                   train_step<Estimator>(s, shape, moe::dispatch::Local{}, kTokens);
                                 })
        ->Iterations(iters)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
}

// Prints nothing: the processes other than the first run the same
// benchmarks (their collectives need them) but do not report.
class Silent : public benchmark::BenchmarkReporter {
 public:
  bool ReportContext(const Context&) override { return true; }
  void ReportRuns(const std::vector<Run>&) override {}
};

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int kept = 1;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0)
      g_quick = true;
    else
      argv[kept++] = argv[i];
  }
  argc = kept;
  for (const Shape shape : {Shape{8, 2, 1024}, Shape{32, 4, 256}}) {
    register_shape<moe::estimator::Sparse>(shape, "Sparse");
    register_shape<moe::estimator::DefaultEMA>(shape, "DefaultEMA");
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) {
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  if (rank_of(MPI_COMM_WORLD) == 0) {
    benchmark::AddCustomContext("processes", std::to_string(size_of(MPI_COMM_WORLD)));
    benchmark::RunSpecifiedBenchmarks();
  } else {
    Silent silent;
    benchmark::RunSpecifiedBenchmarks(&silent);
  }
  benchmark::Shutdown();
  MPI_Finalize();
  return 0;
}
