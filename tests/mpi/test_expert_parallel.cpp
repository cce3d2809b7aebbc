// Expert parallelism over MPI equals one process: run under mpiexec with P
// processes, each process holds E / P experts and its own tokens; the
// global batch is the processes' tokens in rank order. Every process also
// runs a single-process layer (dispatch::Local) on the whole batch, and the
// two must agree on outputs, dx, every gradient (the router's after
// sum_replicated_gradients), the state and the losses over several training
// steps and an eval forward: within 1e-12 (relative, double). Whether the
// first step's outputs are bitwise equal is printed, not required: the
// router's GEMM over a process's rows may round differently from the one
// over the whole batch. Checkpoints round-trip bitwise (required).
//
// Plain main (no doctest): every process runs every case; the failures are
// summed over the processes and rank 0 reports.

#include <mpi.h>

#include <Eigen/Core>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <numeric>
#include <string>
#include <vector>

#include "moe/io/checkpoint.hpp"
#include "moe/moe.hpp"
#include "moe/mpi.hpp"
#include "moe/mpi/checkpoint.hpp"

using namespace moe;
namespace sched = moe::router::schedule;

namespace {

int g_rank = 0, g_size = 1, g_failures = 0;

template <class S>
using Mat = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

void fail(const std::string& what) {
  ++g_failures;
  std::fprintf(stderr, "FAIL (rank %d of %d): %s\n", g_rank, g_size, what.c_str());
}

void expect(bool ok, const std::string& what) {
  if (!ok) fail(what);
}

// Compares two value sequences: relative error past 1e-12 fails; `bitwise`
// asks for identical bits.
struct Comparison {
  double worst = 0;
  bool identical = true;
};

template <class A, class B>
Comparison compare(const std::string& what, const A& got, const B& want, bool bitwise = false) {
  Comparison c;
  if (static_cast<std::size_t>(got.size()) != static_cast<std::size_t>(want.size())) {
    fail(what + ": sizes differ");
    return c;
  }
  for (Index i = 0; i < static_cast<Index>(got.size()); ++i) {
    const double g = static_cast<double>(got.data()[i]), w = static_cast<double>(want.data()[i]);
    if (g != w) c.identical = false;
    c.worst = std::max(c.worst, std::fabs(g - w) / std::max(1.0, std::fabs(w)));
    if (!(std::fabs(g - w) <= 1e-12 * std::max(1.0, std::fabs(w)))) {
      fail(detail::concat(what, "[", i, "]: ", g, " vs one process ", w));
      return c;
    }
  }
  if (bitwise && !c.identical) fail(what + ": not bitwise equal to one process");
  return c;
}

// The global batch: process r has 2 + r + base tokens (the total is not a
// multiple of P for P = 2, 4), or `each` tokens when given.
struct Batch {
  std::vector<Index> sizes, offsets;
  Index total = 0;
  Index mine() const { return sizes[g_rank]; }
  Index first() const { return offsets[g_rank]; }
};

Batch make_batch(Index base, Index each = 0) {
  Batch b;
  for (int r = 0; r < g_size; ++r) {
    b.sizes.push_back(each > 0 ? each : base + 2 + r);
    b.offsets.push_back(b.total);
    b.total += b.sizes.back();
  }
  return b;
}

Mat<double> random_matrix(Index rows, Index cols, std::uint64_t seed) {
  Mat<double> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = 2 * math::uniform01(seed, 7, i) - 1;
  return m;
}

Mat<double> my_rows(const Mat<double>& all, const Batch& b) {
  return all.middleRows(b.first(), b.mine());
}

// The expert tensors of process `rank` inside one process's tensor.
template <class Layer, class Span>
std::span<const double> expert_slice(const Layer& ep, const Span& whole) {
  const auto range = ep.local_experts();
  const std::size_t per = whole.size() / static_cast<std::size_t>(ep.config().experts);
  return std::span<const double>(whole.data() + range.first * per, range.count * per);
}

// Parameters or gradients of the expert-parallel layer against one
// process's: the router's tensors whole, the experts' this process's slice.
template <class Ep, class Buffer>
void compare_parameters(const std::string& what, const Ep& ep, const Buffer& mine,
                        const Buffer& whole, bool bitwise) {
  for (const TensorSpec& spec : mine.layout().specs()) {
    const auto got = mine[spec.name];
    if (Ep::is_expert_tensor(spec.name))
      compare(what + " " + spec.name, got, expert_slice(ep, whole[spec.name]), bitwise);
    else
      compare(what + " " + spec.name, got, whole[spec.name], bitwise);
  }
}

struct Case {
  std::string name;
  LayerConfig config;
  Batch batch;
  int steps = 3;                     // training steps, then one eval forward
  bool identical_tokens = false;     // every token the same: idle experts and processes
  bool previous_assignment = false;  // ACMoE's clusters from a "previous layer"
};

std::vector<int> assignment(const Case& c, int step) {
  std::vector<int> a(static_cast<std::size_t>(c.batch.total));
  for (std::size_t t = 0; t < a.size(); ++t)
    a[t] = static_cast<int>(math::uniform01(99, step, t) * (c.config.experts + 1)) - 1;
  return a;
}

// Trains the two layers side by side (SGD with the same step) and compares.
template <class Router, class Estimator, class Act>
void check_equal(const Case& c, const std::function<Router()>& make_router,
                 const Estimator& estimator) {
  using One = Layer<Router, Estimator, cpu::Backend<double>, Act>;
  using Ep = Layer<Router, Estimator, cpu::Backend<double>, Act, mpi::ExpertParallel>;
  const std::uint64_t seed = 17;
  One one(c.config, make_router(), estimator, seed);
  Ep ep(c.config, make_router(), estimator, seed, cpu::Backend<double>{},
        mpi::ExpertParallel(MPI_COMM_WORLD));
  const std::string name = c.name + " " + Router::kName + " x " + Estimator::kName + " x " +
                           Act::kName + " P=" + std::to_string(g_size);
  compare_parameters(name + " init", ep, ep.parameters(), one.parameters(), true);

  const Index d = c.config.d_model, T = c.batch.total, mine = c.batch.mine();
  typename One::Cache one_cache;
  typename Ep::Cache ep_cache;
  Comparison outputs;
  for (int step = 0; step <= c.steps; ++step) {
    const Mode mode = step < c.steps ? Mode::train : Mode::eval;
    Mat<double> x = random_matrix(T, d, 1000 + step);
    if (c.identical_tokens)
      for (Index t = 1; t < T; ++t) x.row(t) = x.row(0);
    const Mat<double> dy = random_matrix(T, d, 2000 + step);
    const std::vector<int> previous =
        c.previous_assignment ? assignment(c, step) : std::vector<int>{};
    ForwardContext all_context, my_context;
    all_context.previous_assignment = previous;
    if (!previous.empty())
      my_context.previous_assignment =
          std::span<const int>(previous).subspan(c.batch.first(), mine);

    Mat<double> y(T, d), y_mine(mine, d);
    const Mat<double> x_mine = my_rows(x, c.batch);
    one.forward(x, y, one_cache, mode, all_context);
    ep.forward(x_mine, y_mine, ep_cache, mode, my_context);
    // The case's premise: a process receives no rows (DenseExact sends every
    // token to every expert, so there every process does).
    if (c.identical_tokens && g_size > 1 && !Estimator::kComputesAllExperts) {
      const auto& got = ep_cache.dispatch_cache().received_rows();
      std::int64_t empty = std::accumulate(got.begin(), got.end(), 0) == 0 ? 1 : 0;
      MPI_Allreduce(MPI_IN_PLACE, &empty, 1, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
      expect(empty >= 1, name + ": every process received rows");
    }
    const std::string at = name + " step " + std::to_string(step);
    const Comparison cy = compare(at + " y", y_mine, Mat<double>(my_rows(y, c.batch)));
    outputs.worst = std::max(outputs.worst, cy.worst);
    if (step == 0) outputs.identical = cy.identical;  // later steps follow summed gradients
    const auto& s1 = one_cache.stats();
    const auto& s2 = ep_cache.stats();
    const std::vector<double> losses1{s1.aux_loss, s1.load_balance_loss, s1.z_loss, s1.l1_loss};
    const std::vector<double> losses2{s2.aux_loss, s2.load_balance_loss, s2.z_loss, s2.l1_loss};
    compare(at + " losses", losses2, losses1);
    compare(at + " state", ep.state().flat(), one.state().flat());
    if (mode != Mode::train) continue;

    auto g1 = one.make_gradients();
    auto g2 = ep.make_gradients();
    Mat<double> dx(T, d), dx_mine(mine, d);
    one.backward(x, one_cache, dy, dx, g1);
    ep.backward(x_mine, ep_cache, my_rows(dy, c.batch), dx_mine, g2);
    sum_replicated_gradients(ep, g2);
    compare(at + " dx", dx_mine, Mat<double>(my_rows(dx, c.batch)));
    compare_parameters(at + " grad", ep, g2, g1, false);
    optim::Sgd sgd1({.lr = 0.1}), sgd2({.lr = 0.1});
    sgd1.step(one.parameters(), g1);
    sgd2.step(ep.parameters(), g2);
    one.end_step(static_cast<std::uint64_t>(step + 1));
    ep.end_step(static_cast<std::uint64_t>(step + 1));
  }
  compare_parameters(name + " trained", ep, ep.parameters(), one.parameters(), false);
  if (g_rank == 0)
    std::printf(
        "ok  %-70s worst relative difference %.1e, outputs %s\n", name.c_str(), outputs.worst,
        outputs.identical ? "first outputs bitwise equal" : "first outputs not bitwise equal");
}

LayerConfig small(Index experts) { return {.d_model = 6, .d_ff = 5, .experts = experts}; }

router::TopK topk(int k) {
  return {.k = k, .bias = true, .aux_coef = 0.05, .z_coef = 0.01, .init_std = 0.7};
}

// DenseExact computes every pair: it has no capacity.
template <class Act, class Router>
void every_estimator(const Case& c, const std::function<Router()>& make_router) {
  check_equal<Router, estimator::Sparse, Act>(c, make_router, {});
  check_equal<Router, estimator::DefaultEMA, Act>(c, make_router, {.beta = 0.7});
  if (c.config.capacity_factor > 0) {
    Case dropless = c;
    dropless.config.capacity_factor = 0;
    check_equal<Router, estimator::DenseExact, Act>(dropless, make_router, {});
  } else {
    check_equal<Router, estimator::DenseExact, Act>(c, make_router, {});
  }
}

void every_router_and_estimator() {
  const Case plain{"plain", small(4 * g_size), make_batch(3)};
  every_estimator<act::GELU, router::TopK>(plain, [] { return topk(2); });
  every_estimator<act::GELU, router::TopK>(plain, [] {
    auto r = topk(2);
    r.renormalize = true;
    return r;
  });
  // Each layer its own controller: lambda moves by the whole batch's sparsity.
  const int experts = static_cast<int>(plain.config.experts);
  every_estimator<act::GELU, router::ReluL1>(plain, [experts] {
    return router::ReluL1{.controller = std::make_shared<router::LambdaController>(
                              router::LambdaController::for_experts(2, experts, 0.1)),
                          .k = 2,
                          .init_std = 0.5};
  });
  Case clustered = plain;
  clustered.name = "clusters";
  clustered.previous_assignment = true;
  every_estimator<act::GELU, router::AdaptiveCluster>(
      clustered, [] { return router::AdaptiveCluster{.k = 2, .init_gain = 3.0}; });
  every_estimator<act::GELU, router::AdaptiveCluster>(
      plain, [] { return router::AdaptiveCluster{.k = 2, .init_gain = 3.0}; });
  using Frozen = router::RandomFrozen<sched::Linear>;
  every_estimator<act::GELU, Frozen>(plain, [] {
    auto r = router::random_frozen(sched::Linear{.k_min = 1, .k_max = 3, .total_steps = 2});
    r.router().init_std = 0.5;
    return r;
  });

  // Capacity (pairs past it dropped, as one process drops them), dropout
  // (keyed by the global pair index) and expert biases; SwiGLU.
  Case limited{"capacity+dropout", small(2 * g_size), make_batch(4)};
  limited.config.capacity_factor = 0.75;
  limited.config.dropout = 0.25;
  limited.config.expert_bias = true;
  every_estimator<act::ReLU, router::TopK>(limited, [] { return topk(2); });
  limited.config.expert_bias = false;
  every_estimator<act::SwiGLU, router::TopK>(limited, [] { return topk(1); });

  // Every token the same: one expert takes them all, the other experts and
  // (P > 1) the other processes receive no rows.
  Case same{"identical tokens", small(2 * g_size), make_batch(2)};
  same.identical_tokens = true;
  every_estimator<act::GELU, router::TopK>(same, [] { return topk(1); });

  // One token per process; k = E.
  Case one_token{"one token each", small(g_size), make_batch(0, 1)};
  every_estimator<act::GELU, router::TopK>(one_token,
                                           [] { return topk(static_cast<int>(g_size)); });
}

// A refusal on one process (x with a NaN, check_finite) is an Error on every
// process, before any collective; nothing changes, and the next forward
// still equals one process.
void refusal_reaches_every_process() {
  using Ep = Layer<router::TopK, estimator::DefaultEMA, cpu::Backend<double>, act::GELU,
                   mpi::ExpertParallel>;
  LayerConfig config = small(2 * g_size);
  config.check_finite = true;
  Ep ep(config, topk(2), {.beta = 0.5}, 3, cpu::Backend<double>{},
        mpi::ExpertParallel(MPI_COMM_WORLD));
  const auto state = ep.state().flat();
  const std::vector<double> before(state.begin(), state.end());
  Mat<double> x = random_matrix(3, 6, 5), y(3, 6);
  if (g_rank == g_size - 1) x(1, 2) = std::nan("");
  typename Ep::Cache cache;
  std::string message;
  try {
    ep.forward(x, y, cache, Mode::train);
  } catch (const Error& e) {
    message = e.what();
  }
  expect(!message.empty(), "a NaN on the last process: no Error on this one");
  if (g_size > 1 && g_rank != g_size - 1)
    expect(message.find("another process") != std::string::npos,
           "the other processes' Error names another process: " + message);
  compare("state after a refused forward", ep.state().flat(), before, true);
  x(1, 2) = 0.5;
  ep.forward(x, y, cache, Mode::train);  // the group still works
  expect(!cache.stats().tokens_per_expert.empty(), "a forward after a refusal");
  if (g_rank == 0) std::printf("ok  a refusal on one process is an Error on every process\n");
}

void experts_must_divide() {
  if (g_size == 1) return;
  using Ep =
      Layer<router::TopK, estimator::Sparse, cpu::Backend<double>, act::GELU, mpi::ExpertParallel>;
  std::string message;
  try {
    Ep ep(small(2 * g_size + 1), topk(2), {}, 3, cpu::Backend<double>{},
          mpi::ExpertParallel(MPI_COMM_WORLD));
  } catch (const Error& e) {
    message = e.what();
  }
  expect(message.find("expected a multiple of the process count") != std::string::npos,
         "E not divisible by P: " + message);
  if (g_rank == 0) std::printf("ok  E not divisible by P is an Error on every process\n");
}

// P processes -> one file -> one process -> one file -> P processes, exact.
void checkpoint_round_trip() {
  using One = Layer<router::TopK, estimator::DefaultEMA, cpu::Backend<double>, act::SwiGLU>;
  using Ep = Layer<router::TopK, estimator::DefaultEMA, cpu::Backend<double>, act::SwiGLU,
                   mpi::ExpertParallel>;
  const LayerConfig config = small(2 * g_size);
  Ep ep(config, topk(2), {.beta = 0.5}, 11, cpu::Backend<double>{},
        mpi::ExpertParallel(MPI_COMM_WORLD));
  // Make it differ from a fresh layer: a training step.
  const Batch b = make_batch(3);
  const Mat<double> x = random_matrix(b.total, 6, 8);
  Mat<double> y(b.mine(), 6), dx(b.mine(), 6);
  typename Ep::Cache cache;
  ep.forward(my_rows(x, b), y, cache, Mode::train);
  auto g = ep.make_gradients();
  ep.backward(my_rows(x, b), cache, my_rows(random_matrix(b.total, 6, 9), b), dx, g);
  sum_replicated_gradients(ep, g);
  optim::Sgd({.lr = 0.5}).step(ep.parameters(), g);

  const auto dir = std::filesystem::temp_directory_path();
  const auto from_p = dir / ("moe_mpi_from_p" + std::to_string(g_size) + ".safetensors");
  const auto from_one = dir / ("moe_mpi_from_one" + std::to_string(g_size) + ".safetensors");
  mpi::save_layer(from_p, ep);
  if (g_size > 1) {  // one process's functions refuse a sharded layer (saved only its share)
    std::string refused;
    try {
      io::save_layer(dir / "moe_mpi_refused.safetensors", ep);
    } catch (const Error& e) {
      refused = e.what();
    }
    expect(refused.find("sharded over") != std::string::npos,
           "io::save_layer of a sharded layer: no Error");
  }
  One one(config, topk(2), {.beta = 0.5}, 99);  // another seed: everything must come from the file
  io::load_layer(from_p, one);
  compare_parameters("P -> 1 parameters", ep, ep.parameters(), one.parameters(), true);
  compare("P -> 1 state", ep.state().flat(), one.state().flat(), true);
  if (g_rank == 0) io::save_layer(from_one, one);
  MPI_Barrier(MPI_COMM_WORLD);
  Ep back(config, topk(2), {.beta = 0.5}, 99, cpu::Backend<double>{},
          mpi::ExpertParallel(MPI_COMM_WORLD));
  mpi::load_layer(from_one, back);
  compare_parameters("1 -> P parameters", back, back.parameters(), one.parameters(), true);
  compare("1 -> P state", back.state().flat(), one.state().flat(), true);

  // A missing file is an Error on every process, and changes nothing.
  const auto params = back.parameters().flat();
  const std::vector<double> before(params.begin(), params.end());
  std::string message;
  try {
    mpi::load_layer(dir / "moe_mpi_no_such_file.safetensors", back);
  } catch (const Error& e) {
    message = e.what();
  }
  expect(!message.empty(), "a missing checkpoint: no Error");
  compare("parameters after a refused load", std::as_const(back).parameters().flat(), before, true);
  MPI_Barrier(MPI_COMM_WORLD);
  if (g_rank == 0) {
    std::filesystem::remove(from_p);
    std::filesystem::remove(from_one);
    std::printf("ok  checkpoints P -> 1 -> P, bitwise\n");
  }
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &g_size);
  try {
    every_router_and_estimator();
    refusal_reaches_every_process();
    experts_must_divide();
    checkpoint_round_trip();
  } catch (const std::exception& e) {
    fail(std::string("exception: ") + e.what());
  }
  int failures = g_failures;
  MPI_Allreduce(MPI_IN_PLACE, &failures, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  if (g_rank == 0)
    std::printf("%s: %d failures over %d processes\n", failures ? "FAILED" : "passed", failures,
                g_size);
  MPI_Finalize();
  return failures == 0 ? 0 : 1;
}
