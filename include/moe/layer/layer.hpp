#pragma once
// moe::Layer: a Mixture-of-Experts feed-forward layer composed from a router,
// a gradient estimator, an expert backend, an activation and a dispatcher
// (docs/algorithms.md sections 1 to 4):
//
//   y_t = sum_{i in A_t} G_ti E_i(x_t)  (+ the estimator's term for i outside A_t)
//
// forward() fills a Cache (one per micro-batch in flight); backward() returns
// dL/dx and *accumulates* parameter gradients for the loss
//   L = <dy, y> + aux_loss,
// i.e. the router's auxiliary loss (reported in cache.stats().aux_loss) is
// part of the loss the backward differentiates: callers add its value to
// their loss and do nothing else. A forward is route, dispatch, experts,
// combine, estimator; the pieces are layer/{selection, expert_ffn, combine,
// cache}.hpp and the dispatch policy.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <string_view>
#include <utility>

#include "moe/core/concepts.hpp"
#include "moe/core/config.hpp"
#include "moe/core/context.hpp"
#include "moe/core/error.hpp"
#include "moe/core/routing.hpp"
#include "moe/core/tensor_buffer.hpp"
#include "moe/core/view.hpp"
#include "moe/dispatch/local.hpp"
#include "moe/layer/cache.hpp"
#include "moe/layer/checks.hpp"
#include "moe/layer/combine.hpp"
#include "moe/layer/expert_ffn.hpp"
#include "moe/layer/identity.hpp"
#include "moe/layer/selection.hpp"
#include "moe/math/random.hpp"

namespace moe {

template <class Router, class Estimator, class Backend, class Activation,
          class Dispatcher = dispatch::Local>
requires BackendPolicy<Backend> && RouterPolicy<Router, Backend> &&
    EstimatorPolicy<Estimator, Backend> && ActivationPolicy<Activation> &&
    DispatchPolicy<Dispatcher, Backend>
class Layer {
 public:
  using Scalar = typename Backend::Scalar;
  using Parameters = TensorBuffer<Scalar>;
  using Cache = LayerCache<Router, Estimator, Backend, Dispatcher>;
  // GEMM1 output columns per hidden unit: gated activations read (gate, up).
  static constexpr Index kInputWidth = moe::kInputWidth<Activation>;

  Layer(const LayerConfig& config, Router router = {}, Estimator estimator = {},
        std::uint64_t seed = 0, Backend backend = Backend{}, Dispatcher dispatcher = {})
      : config_(config),
        router_(std::move(router)),
        estimator_(std::move(estimator)),
        backend_(std::move(backend)),
        dispatcher_(std::move(dispatcher)),
        seed_(seed) {
    const ProcessGroup& group = dispatcher_.group();
    group.agree("moe::Layer", [&] { validate_config(); });
    const auto fingerprint = detail::layer_fingerprint<Router, Estimator, Activation, Scalar>(
        config_, seed_, router_.nominal_k());
    group.require_same(fingerprint.data(), static_cast<Index>(fingerprint.size()),
                       "moe::Layer: the layer's shape, options, policies and seed");
    local_experts_ = dispatcher_.local_experts(config_.experts);
    params_ = Parameters(parameter_layout(), backend_.memory_resource());
    state_ = TensorBuffer<double>(state_layout(), backend_.memory_resource());
    state_["layer.dropout_seed"][0] = static_cast<double>(seed_ >> 32);
    state_["layer.dropout_seed"][1] = static_cast<double>(seed_ & 0xFFFFFFFFull);
    router_.save_state(state_);
    initialize();
  }

  // PyTorch nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights
  // and biases; the router initialises its own weights. Deterministic in seed.
  void initialize() {
    parameters_version_.renew();
    router_.init(params_, config_, math::hash3(seed_, kRouterSeedStream, 0));
    const double bound1 = 1.0 / std::sqrt(static_cast<double>(config_.d_model));
    const double bound2 = 1.0 / std::sqrt(static_cast<double>(config_.d_ff));
    fill_uniform("experts.w1", bound1, 1);
    fill_uniform("experts.w2", bound2, 2);
    if (config_.expert_bias) {
      fill_uniform("experts.b1", bound1, 3);
      fill_uniform("experts.b2", bound2, 4);
    }
  }

  // y = MoE(x); x and y are (T, d_model), row-major. x must stay unchanged
  // until the backward of this cache. Eval forwards change nothing in the
  // layer, so several threads may run them at once, each with its own cache.
  void forward(ConstMatrixView<Scalar> x, MatrixView<Scalar> y, Cache& cache, Mode mode,
               const ForwardContext& context = {}) {
    const ProcessGroup& group = dispatcher_.group();
    group.agree("moe::Layer::forward", [&] {
      check_forward(x, y);
      router_.validate(config_);  // runtime k may have changed since construction
      router_.check_context(context, x.rows(), config_);
    });
    require_same_forward(mode);
    auto& c = detail::CacheAccess::data(cache);
    detail::run_or_fail(group, "forward", x.rows(), config_, "the cache is left empty",
                        [&] { run_forward(x, y, c, mode, context); });
  }

  // dx = dL/dx and grads += dL/dparameters for L = <dy, y> + aux_loss, where
  // y and aux_loss are those of the forward that filled `cache` with this x.
  // The cache holds the backward's scratch too.
  void backward(ConstMatrixView<Scalar> x, Cache& cache, ConstMatrixView<Scalar> dy,
                MatrixView<Scalar> dx, Parameters& grads) {
    auto& c = detail::CacheAccess::data(cache);
    const ProcessGroup& group = dispatcher_.group();
    group.agree("moe::Layer::backward", [&] { check_backward(x, c, dy, dx, grads); });
    detail::run_or_fail(group, "backward", x.rows(), config_,
                        "grads may hold part of this backward's gradient",
                        [&] { run_backward(x, c, dy, dx, grads); });
  }

  // Called once after each optimiser step with the number of steps done:
  // stateful policies (k schedules, the ReLU router's lambda) advance here.
  void end_step(std::uint64_t step) {
    router_.end_step(step);
    router_.save_state(state_);
  }

  // Resumes a k schedule at `steps` optimiser steps done (Scheduled routers:
  // RandomFrozen), without an optimiser step: the next training forward uses
  // the schedule's k for it, and the state records it.
  void set_schedule_step(std::uint64_t steps) requires requires(Router& r) { r.set_step(steps); }
  {
    router_.set_step(steps);
    router_.save_state(state_);
  }

  // Non-parameter state (no gradient), one flat buffer with named views:
  // "layer.train_forwards", the estimator's "estimator.ema", the router's
  // ("router.lambda", "router.step"). Together with parameters() it restores
  // training exactly: save both between steps, restore with load_state().
  const TensorBuffer<double>& state() const { return state_; }
  TensorBuffer<double>& state() { return state_; }

  // Replaces the state (e.g. from a checkpoint) and hands policies their part
  // back (the shared lambda, the schedule's k). Strong guarantee: everything
  // is checked (every value finite: a NaN in the EMA would poison every later
  // forward), and the policies take their part, before the state changes,
  // so on an error the layer is unchanged (policies validate before they
  // change anything).
  void load_state(const TensorBuffer<double>& state) {
    constexpr const char* where = "moe::Layer::load_state";
    detail::require(state.same_layout(state_), where, ": a state of size ", state.size(),
                    " with another layout, expected this layer's (size ", state_.size(), ")");
    detail::require_whole(state["layer.train_forwards"][0], 53, where, "layer.train_forwards");
    detail::require_whole(state["layer.dropout_seed"][0], 32, where, "layer.dropout_seed[0]");
    detail::require_whole(state["layer.dropout_seed"][1], 32, where, "layer.dropout_seed[1]");
    // Every value within the scalar type's range too: an EMA of 1e300 is
    // finite in the state's doubles but Inf in a float layer's outputs.
    if constexpr (std::numeric_limits<Scalar>::is_specialized)
      detail::require_finite(state, where, static_cast<double>(std::numeric_limits<Scalar>::max()));
    else
      detail::require_finite(state, where);
    router_.restore(state);
    std::copy(state.flat().begin(), state.flat().end(), state_.flat().begin());
  }

  // A zero gradient buffer with the parameters' layout.
  Parameters make_gradients() const { return params_.zeros_like(); }

  // The parameters for writing (an optimiser's step, a checkpoint's load):
  // each call counts as a change, so a backward refuses a cache whose forward
  // saw other weights. Read them through the const overload
  // (std::as_const(layer).parameters()) between a forward and its backward.
  Parameters& parameters() {
    parameters_version_.renew();
    return params_;
  }
  const Parameters& parameters() const { return params_; }
  const LayerConfig& config() const { return config_; }
  Router& router() { return router_; }
  const Router& router() const { return router_; }
  const Estimator& estimator() const { return estimator_; }
  const Backend& backend() const { return backend_; }
  const Dispatcher& dispatcher() const { return dispatcher_; }
  // The experts whose weights this process holds (all E with one process).
  ExpertRange local_experts() const { return local_experts_; }
  // Whether a parameter tensor is the experts' ("experts.*": this process's
  // experts, E of them with one process) rather than the router's (every
  // process holds all of it).
  static bool is_expert_tensor(std::string_view name) { return name.starts_with("experts."); }

  // Pairs one expert may take: ceil(c T k / E), at least 1, or -1 when
  // dropless. Never more than T pairs can reach one expert, which also bounds
  // huge factors.
  Index capacity(Index tokens) const {
    if (config_.capacity_factor <= 0) return -1;
    const double pairs =
        std::ceil(config_.capacity_factor * static_cast<double>(tokens) *
                  static_cast<double>(router_.nominal_k()) / static_cast<double>(config_.experts));
    // At least one pair: a tiny factor whose product underflows to 0 would drop everything.
    if (pairs < 1) return 1;
    return pairs >= static_cast<double>(tokens) ? tokens : static_cast<Index>(pairs);
  }

 private:
  using CacheData = detail::LayerCacheData<Router, Estimator, Backend, Dispatcher>;
  using Pairs = Selection<Scalar, Backend::template Buffer>;

  static constexpr std::uint64_t kRouterSeedStream = 1;
  static constexpr std::uint64_t kExpertSeedStream = 2;
  static constexpr std::uint64_t kDropoutSeedStream = 3;

  // The router's parameters (every process has them all) and the experts'
  // of this process (all E with one process).
  std::shared_ptr<TensorLayout> parameter_layout() const {
    auto layout = std::make_shared<TensorLayout>();
    router_.add_parameters(*layout, config_);
    const Index E = local_experts_.count, d = config_.d_model, h = config_.d_ff;
    layout->add("experts.w1", {E, d, kInputWidth * h});  // SwiGLU: [W1 | W3]
    if (config_.expert_bias) layout->add("experts.b1", {E, h});
    layout->add("experts.w2", {E, h, d});
    if (config_.expert_bias) layout->add("experts.b2", {E, d});
    return layout;
  }

  std::shared_ptr<TensorLayout> state_layout() const {
    auto layout = std::make_shared<TensorLayout>();
    layout->add("layer.train_forwards", {1});  // keys each training forward's dropout mask
    layout->add("layer.dropout_seed", {2});    // the seed's two 32-bit halves, exact in double
    router_.add_state(*layout, config_);
    estimator_.add_state(*layout, config_);
    return layout;
  }

  // The forward and backward after their checks. The cache starts over:
  // unfilled until this forward completes.
  void run_forward(ConstMatrixView<Scalar> x, MatrixView<Scalar> y, CacheData& c, Mode mode,
                   const ForwardContext& context) {
    const ProcessGroup& group = dispatcher_.group();
    begin(c, x.rows());
    ForwardContext routing = context;
    routing.group = &group;  // the processes whose tokens make up the batch
    router_.forward(backend_, mode, x, std::as_const(params_), routing, c.selection, c.router);
    detail::write_top1(backend_, c.selection, c.top1);
    const auto& pairs = computed_pairs(c);
    dispatcher_.plan(backend_, pairs, capacity(group.sum(x.rows())), c.dispatch);
    run_experts(x, mode, c);
    const auto& tokens = c.dispatch.tokens();
    combine(backend_, token_pairs(c.selection, pairs, tokens), c.out_rows.data(), config_.d_model,
            tokens.rows(), y.data());
    const auto batch = detail::estimator_batch(c, dispatcher_.group());
    estimator_.update_state(backend_, mode, batch, state_, c.estimator);  // before use
    estimator_.add_unselected_outputs(backend_, batch, std::as_const(state_), c.estimator,
                                      y.data());
    detail::keep_state(backend_, state_, c.state);
    detail::record_stats<Estimator>(config_, c);
    c.filled = true;
  }

  void run_backward(ConstMatrixView<Scalar> x, CacheData& c, ConstMatrixView<Scalar> dy,
                    MatrixView<Scalar> dx, Parameters& grads) {
    const Index T = x.rows(), d = config_.d_model, E = config_.experts;
    const auto& tokens = c.dispatch.tokens();
    const auto pairs = token_pairs(c.selection, computed_pairs(std::as_const(c)), tokens);
    auto& ws = c.workspace;
    ws.d_out.resize(static_cast<std::size_t>(tokens.rows() * d));
    ws.d_gates.resize(static_cast<std::size_t>(T * E));
    ws.d_logits.resize(static_cast<std::size_t>(T * E));
    combine_backward(backend_, tokens, pairs, c.out_rows.data(), dy.data(), d, ws.d_out.data(),
                     ws.d_gates.data());
    estimator_.add_unselected_gate_gradients(backend_,
                                             detail::estimator_batch(c, dispatcher_.group()),
                                             c.state, c.estimator, dy.data(), ws.d_gates.data());
    backward_experts(c, grads);
    sum_input_gradients(backend_, pairs, ws.d_x_rows.data(), d, tokens.rows(), dx.data());
    // The router adds its own dL/dx and parameter gradients (aux loss included).
    router_.backward(backend_, x, std::as_const(params_), std::as_const(c.selection),
                     std::as_const(c.router), ws.d_gates.data(), dx.data(), grads,
                     ws.d_logits.data());
    c.backward_done = true;
  }

  void begin(CacheData& c, Index tokens) const {
    c.filled = false;
    c.backward_done = false;
    c.owner = id_.value();
    c.parameters_version = parameters_version_.value();
    c.tokens = tokens;
    c.d_model = config_.d_model;
    c.d_ff = config_.d_ff;
    c.experts = config_.experts;
    c.selection.tokens = tokens;
    c.selection.experts = config_.experts;
  }

  // Gather, the experts' side, the expert FFN, and the outputs back on the
  // tokens' side (c.out_rows).
  void run_experts(ConstMatrixView<Scalar> x, Mode mode, CacheData& c) {
    const Index d = config_.d_model;
    const auto& tokens = c.dispatch.tokens();
    c.x_rows.resize(static_cast<std::size_t>(tokens.rows() * d));
    gather_rows(backend_, tokens, x.data(), d, c.x_rows.data());
    auto& x_at_experts = dispatcher_.experts_side(c.x_rows, c.x_rows_at_experts);
    dispatcher_.to_experts(backend_, c.dispatch, c.x_rows, x_at_experts, d);
    const auto& experts = c.dispatch.experts();
    auto& out_at_experts = dispatcher_.experts_side(c.out_rows, c.out_rows_at_experts);
    out_at_experts.resize(static_cast<std::size_t>(experts.rows() * d));
    c.activations.dropout = next_dropout(mode);
    c.activations.derivatives = mode == Mode::train;  // the backward multiplies by them
    expert_forward<Activation>(backend_, experts, d, config_.d_ff,
                               expert_weights(params_, config_.expert_bias), x_at_experts.data(),
                               c.activations, out_at_experts.data());
    dispatcher_.to_tokens(backend_, c.dispatch, out_at_experts, c.out_rows, d);
  }

  // The experts' backward from the combine's d_out to each row's dL/dx on the
  // tokens' side (c.workspace.d_x_rows).
  void backward_experts(CacheData& c, Parameters& grads) {
    const Index d = config_.d_model;
    auto& ws = c.workspace;
    auto& d_out_at_experts = dispatcher_.experts_side(ws.d_out, ws.d_out_at_experts);
    dispatcher_.to_experts(backend_, c.dispatch, ws.d_out, d_out_at_experts, d);
    const auto& experts = c.dispatch.experts();
    auto& d_x_at_experts = dispatcher_.experts_side(ws.d_x_rows, ws.d_x_rows_at_experts);
    d_x_at_experts.resize(static_cast<std::size_t>(experts.rows() * d));
    const auto& x_at_experts = dispatcher_.experts_side(c.x_rows, c.x_rows_at_experts);
    expert_backward<Activation>(
        backend_, experts, d, config_.d_ff, expert_weights(params_, config_.expert_bias),
        x_at_experts.data(), c.activations, d_out_at_experts.data(), ws.experts,
        expert_gradients(grads, config_.expert_bias), d_x_at_experts.data());
    dispatcher_.to_tokens(backend_, c.dispatch, d_x_at_experts, ws.d_x_rows, d);
  }

  // The dropout of this forward: the rate in training (none in eval), keyed
  // by the count of training forwards so far, kept in the state so that a
  // restored checkpoint draws the same masks.
  Dropout next_dropout(Mode mode) {
    double& train_forwards = state_["layer.train_forwards"][0];
    const auto halves = state_["layer.dropout_seed"];
    const std::uint64_t seed =
        (static_cast<std::uint64_t>(halves[0]) << 32) | static_cast<std::uint64_t>(halves[1]);
    const Dropout dropout{
        mode == Mode::train ? config_.dropout : 0.0,
        math::hash3(seed, kDropoutSeedStream, static_cast<std::uint64_t>(train_forwards))};
    if (mode == Mode::train) train_forwards += 1;
    return dropout;
  }

  // A forward's collectives depend on its mode and k, its dropout on the
  // count of training forwards: every process of the group must share them.
  void require_same_forward(Mode mode) const {
    if (dispatcher_.group().size() == 1) return;
    const double values[] = {mode == Mode::train ? 1.0 : 0.0,
                             static_cast<double>(router_.nominal_k()),
                             state_["layer.train_forwards"][0]};
    dispatcher_.group().require_same(values, 3,
                                     "moe::Layer::forward: the mode, k and training forwards");
  }

  void validate_config() const {
    detail::check_config<Activation>(config_);
    router_.validate(config_);
    estimator_.validate(config_);
  }

  void check_forward(ConstMatrixView<Scalar> x, MatrixView<Scalar> y) const {
    detail::check_batch_size(config_, x.rows(), kInputWidth);
    detail::check_forward_arguments<Scalar>(config_, x, y);
    detail::check_forward_buffers(y, params_.flat(), state_.flat());
    detail::check_finite(backend_, config_, "forward", "x", x);
  }

  void check_backward(ConstMatrixView<Scalar> x, const CacheData& c, ConstMatrixView<Scalar> dy,
                      MatrixView<Scalar> dx, const Parameters& grads) const {
    detail::require(c.filled,
                    "moe::Layer::backward: cache.filled()=false, expected a cache filled by "
                    "forward");
    detail::check_cache_shape(config_, c);
    detail::check_cache_owner(c, id_.value(), parameters_version_.value());
    detail::check_backward_arguments<Scalar>(config_, c.tokens, x, dy, dx);
    detail::require(grads.same_layout(params_), "moe::Layer::backward: grads has size ",
                    grads.size(), " and another layout, expected layer.make_gradients() (size ",
                    params_.size(), ")");
    detail::require(grads.memory()->is_equal(*backend_.memory_resource()),
                    "moe::Layer::backward: grads lives in another memory than the ", Backend::kName,
                    " backend's, expected layer.make_gradients()");
    detail::check_backward_buffers(x, dx, grads.flat(), params_.flat(), state_.flat());
    detail::check_finite(backend_, config_, "backward", "dy", dy);
  }

  // An expert tensor's draws by its index among all E experts' values, so
  // that each process holds the values one process holding every expert
  // would.
  void fill_uniform(const char* name, double bound, std::uint64_t stream) {
    auto values = params_[name];
    const std::uint64_t key = math::hash3(seed_, kExpertSeedStream, stream);
    const auto first = static_cast<std::uint64_t>(local_experts_.first) *
                       (values.size() / static_cast<std::size_t>(local_experts_.count));
    for (std::size_t i = 0; i < values.size(); ++i)
      values[i] = static_cast<Scalar>(bound * (2.0 * math::uniform01(key, 0, first + i) - 1.0));
  }

  // The pairs the experts compute (see LayerCacheData::all_pairs).
  const Pairs& computed_pairs(CacheData& c) const {
    if constexpr (!Estimator::kComputesAllExperts) {
      return c.selection;
    } else {
      detail::all_expert_pairs(backend_, c.selection, c.all_pairs);
      return c.all_pairs;
    }
  }
  const Pairs& computed_pairs(const CacheData& c) const {
    return Estimator::kComputesAllExperts ? c.all_pairs : c.selection;
  }

  detail::LayerId id_;  // caches remember which layer filled them
  LayerConfig config_;
  Router router_;
  Estimator estimator_;
  Backend backend_;
  Dispatcher dispatcher_;
  ExpertRange local_experts_;  // the experts whose weights this process holds
  std::uint64_t seed_ = 0;
  TensorBuffer<double> state_;  // non-parameter state: counters, estimator buffers, ...
  Parameters params_;
  detail::ParametersVersion parameters_version_;
};

}  // namespace moe
