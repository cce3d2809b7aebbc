// Fuzz target for the layer's public entry points (libFuzzer entry point;
// also linked into layer_driver.cpp for a deterministic ctest). The input
// bytes choose the policies, the shape and options (sizes 0 and 1, k past E,
// NaN and negative factors), the inputs' values (NaN, Inf, huge), the
// previous layer's assignment, and a sequence of calls: forward in either
// mode, backward, end_step, load_state of a perturbed state, and for the
// scheduled router (RandomFrozen) set_k (its inference k, 0 to E + 1) and
// set_schedule_step (steps up to 2^64 - 1).
//
// Any call may be refused with moe::Error. Anything else is a bug: another
// exception escapes and terminates, a sanitizer reports, or an invariant
// fails and aborts. The invariants: a refused call changes neither the
// parameters nor the state, and a layer whose schedule step was set accepts
// its own state back.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <memory>
#include <vector>

#include "moe/moe.hpp"

namespace {

void invariant(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "fuzz_layer: invariant violated: %s\n", what);
    std::abort();
  }
}

// The input as a stream of choices; 0 once it runs out.
class Bytes {
 public:
  Bytes(const std::uint8_t* data, std::size_t size) : data_(data), size_(size) {}
  unsigned next() { return at_ < size_ ? data_[at_++] : 0u; }
  unsigned below(unsigned n) { return n == 0 ? 0 : next() % n; }
  bool flag() { return (next() & 1u) != 0; }
  double value() {  // mostly ordinary, sometimes special
    const unsigned b = next();
    switch (b % 16) {
      case 0:
        return std::numeric_limits<double>::quiet_NaN();
      case 1:
        return std::numeric_limits<double>::infinity();
      case 2:
        return -1e300;
      case 3:
        return 0.0;
      default:
        return (static_cast<double>(b) - 128.0) / 37.0;
    }
  }
  double factor() {
    const double choices[] = {0.0,
                              0.5,
                              1.0,
                              2.0,
                              5e-324,
                              -1.0,
                              std::numeric_limits<double>::quiet_NaN(),
                              std::numeric_limits<double>::infinity()};
    return choices[below(8)];
  }
  // 1..n mostly, sometimes 0 (which the layer refuses).
  unsigned size(unsigned n) { return below(16) == 0 ? 0 : 1 + below(n); }
  bool done() const { return at_ >= size_; }

 private:
  const std::uint8_t* data_;
  std::size_t size_, at_ = 0;
};

using Backend = moe::cpu::Backend<double>;
using Matrix = std::vector<double>;

template <class L>
std::vector<double> snapshot(const L& layer) {
  std::vector<double> out(layer.parameters().flat().begin(), layer.parameters().flat().end());
  out.insert(out.end(), layer.state().flat().begin(), layer.state().flat().end());
  return out;
}

// Calls f; a moe::Error must leave the parameters and the state as they were.
template <class L, class F>
void refusable(const L& layer, F&& f) {
  const auto before = snapshot(layer);
  try {
    f();
  } catch (const moe::Error&) {
    const auto after = snapshot(layer);
    invariant(after.size() == before.size(), "a refused call resized the layer");
    for (std::size_t i = 0; i < after.size(); ++i)
      invariant(after[i] == before[i] || (std::isnan(after[i]) && std::isnan(before[i])),
                "a refused call changed the parameters or the state");
  }
}

// A schedule step, ordinary or at the edges of what the state's double
// holds; once accepted, the layer must take its own state back.
template <class L>
void set_step(Bytes& in, L& layer) {
  constexpr std::uint64_t kLimit = std::uint64_t{1} << 53;
  const std::uint64_t choices[] = {in.next(), kLimit - 1, kLimit, kLimit + 1,
                                   std::numeric_limits<std::uint64_t>::max()};
  const std::uint64_t steps = choices[in.below(5)];
  bool accepted = false;
  refusable(layer, [&] {
    layer.set_schedule_step(steps);
    accepted = true;
  });
  if (!accepted) return;
  try {
    layer.load_state(layer.state());
  } catch (const moe::Error&) {
    invariant(false, "a layer refused its own state after set_schedule_step");
  }
}

template <class Router, class Estimator, class Act>
void drive(Bytes& in, Router router, const moe::LayerConfig& config) {
  using L = moe::Layer<Router, Estimator, Backend, Act>;
  std::unique_ptr<L> layer;
  try {
    layer = std::make_unique<L>(config, std::move(router), Estimator{}, in.next(), Backend(1));
  } catch (const moe::Error&) {
    return;  // a configuration refused up front
  }
  const moe::Index d = config.d_model;
  typename L::Cache cache;
  moe::Index tokens = 0;
  Matrix x, y, dx, dy;
  std::vector<int> previous;
  auto grads = layer->make_gradients();
  for (int op = 0; op < 6 && !in.done(); ++op) {
    switch (in.below(6)) {
      case 0:
      case 1: {  // forward
        tokens = in.size(8);
        x.assign(static_cast<std::size_t>(tokens * d), 0.0);
        for (double& v : x) v = in.value();
        y.assign(x.size(), 0.0);
        previous.assign(static_cast<std::size_t>(in.flag() ? tokens : in.below(3)), 0);
        for (int& c : previous)
          c = static_cast<int>(in.below(static_cast<unsigned>(config.experts) + 2)) - 1;
        const moe::Mode mode = in.flag() ? moe::Mode::train : moe::Mode::eval;
        refusable(*layer, [&] {
          layer->forward(moe::MatrixView<const double>(x.data(), tokens, d),
                         moe::MatrixView<double>(y.data(), tokens, d), cache, mode,
                         {.previous_assignment = previous});
        });
        break;
      }
      case 2: {  // backward (of whatever the cache holds)
        dy.assign(x.size(), 0.0);
        for (double& v : dy) v = in.value();
        dx.assign(x.size(), 0.0);
        refusable(*layer, [&] {
          layer->backward(moe::MatrixView<const double>(x.data(), tokens, d), cache,
                          moe::MatrixView<const double>(dy.data(), tokens, d),
                          moe::MatrixView<double>(dx.data(), tokens, d), grads);
        });
        break;
      }
      case 3:  // end of an optimiser step
        refusable(*layer, [&] { layer->end_step(in.next()); });
        break;
      case 4: {  // a perturbed state
        auto state = layer->state();
        if (state.size() > 0)
          state.flat()[in.below(static_cast<unsigned>(state.size()))] = in.value();
        refusable(*layer, [&] { layer->load_state(state); });
        break;
      }
      case 5:  // the scheduled router's runtime k and step
        if constexpr (requires { layer->set_schedule_step(0); }) {
          if (in.flag()) {
            layer->router().set_k(
                static_cast<int>(in.below(static_cast<unsigned>(config.experts) + 2)));
          } else {
            set_step(in, *layer);
          }
        }
        break;
    }
  }
}

template <class Estimator>
void drive_router(Bytes& in, const moe::LayerConfig& config, int k) {
  namespace r = moe::router;
  switch (in.below(4)) {
    case 0:
      return drive<r::TopK, Estimator, moe::act::GELU>(
          in,
          r::TopK{.k = k,
                  .renormalize = in.flag(),
                  .aux_coef = in.below(8) == 0 ? in.factor() : 0.01,
                  .z_coef = in.below(8) == 0 ? in.factor() : 0.001},
          config);
    case 1: {
      std::shared_ptr<r::LambdaController> controller;
      try {
        controller = std::make_shared<r::LambdaController>(
            r::LambdaController::for_experts(k, static_cast<int>(config.experts)));
      } catch (const moe::Error&) {
        return;
      }
      return drive<r::ReluL1, Estimator, moe::act::GELU>(
          in, r::ReluL1{.controller = controller, .k = k}, config);
    }
    case 2:
      return drive<r::AdaptiveCluster, Estimator, moe::act::GELU>(in, r::AdaptiveCluster{.k = k},
                                                                  config);
    default:
      return drive<r::RandomFrozen<r::schedule::Constant>, Estimator, moe::act::GELU>(
          in, r::random_frozen(r::schedule::Constant{k}), config);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Bytes in(data, size);
  moe::LayerConfig config;
  config.d_model = static_cast<moe::Index>(in.size(4));
  config.d_ff = static_cast<moe::Index>(in.size(4));
  config.experts = static_cast<moe::Index>(in.size(5));
  config.expert_bias = in.flag();
  config.dropout = in.below(4) == 0 ? in.factor() / 4 : 0.0;
  config.capacity_factor = in.below(4) == 0 ? in.factor() : 0.0;
  config.check_finite = in.flag();
  const int k = static_cast<int>(
      in.below(8) == 0
          ? in.below(8)
          : 1 + in.below(static_cast<unsigned>(config.experts > 0 ? config.experts : 1)));
  try {
    switch (in.below(3)) {
      case 0:
        drive_router<moe::estimator::Sparse>(in, config, k);
        break;
      case 1:
        drive_router<moe::estimator::DefaultEMA>(in, config, k);
        break;
      default:
        drive_router<moe::estimator::DenseExact>(in, config, k);
        break;
    }
  } catch (const moe::Error&) {
    // refused outside a call (a router or controller option)
  }
  return 0;
}
