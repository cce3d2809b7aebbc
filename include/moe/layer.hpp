#pragma once
// moe::Layer: a Mixture-of-Experts feed-forward layer composed from a router,
// a gradient estimator, an expert backend and an activation (ALGORITHMS.md 1-4).
//
//   y_t = sum_{i in A_t} G_ti E_i(x_t)  (+ the estimator's term for i outside A_t)
//
// forward() fills a Cache (one per micro-batch in flight); backward() returns
// dL/dx and *accumulates* parameter gradients for the loss
//   L = <dy, y> + aux_loss,
// i.e. the router's auxiliary loss (reported in cache.stats().aux_loss) is part
// of the loss the backward differentiates: callers add its value to their loss
// and do nothing else.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <span>
#include <utility>
#include <vector>

#include "moe/core/concepts.hpp"
#include "moe/core/config.hpp"
#include "moe/core/context.hpp"
#include "moe/core/error.hpp"
#include "moe/core/routing.hpp"
#include "moe/core/tensor_buffer.hpp"
#include "moe/core/view.hpp"
#include "moe/math/random.hpp"

namespace moe {

namespace detail {

// The layer's element-wise steps that are not per-token math: free functions
// because nvcc's device lambdas cannot live in private member functions.

// Each token's first selected expert (routers list the best first), or -1.
template <class B, class S>
void write_top1(const B& be, const Selection<S, B::template Buffer>& sel,
                typename B::template Buffer<int>& top1) {
  top1.resize(static_cast<std::size_t>(sel.tokens));
  const Index* offsets = sel.token_offsets.data();
  const int* chosen = sel.pair_expert.data();
  int* out = top1.data();
  be.parallel_for(
      sel.tokens,
      [=] MOE_HOST_DEVICE(Index t) {
        out[t] = offsets[t + 1] > offsets[t] ? chosen[offsets[t]] : -1;
      },
      sel.tokens);
}

// Every expert for every token, the selected ones first in their order: the
// pairs an estimator that computes all experts (DenseExact) needs.
template <class B, class S>
void all_expert_pairs(const B& be, const Selection<S, B::template Buffer>& sel,
                      Selection<S, B::template Buffer>& all) {
  const Index T = sel.tokens, E = sel.experts;
  all.tokens = T;
  all.experts = E;
  all.token_offsets.resize(static_cast<std::size_t>(T + 1));
  all.pair_expert.resize(static_cast<std::size_t>(T * E));
  const Index* selected = sel.token_offsets.data();
  const int* chosen = sel.pair_expert.data();
  Index* offsets = all.token_offsets.data();
  int* experts = all.pair_expert.data();
  be.parallel_for(
      T,
      [=] MOE_HOST_DEVICE(Index t) {
        offsets[t + 1] = (t + 1) * E;
        if (t == 0) offsets[0] = 0;
        int* out = experts + t * E;
        Index n = 0;
        for (Index p = selected[t]; p < selected[t + 1]; ++p) out[n++] = chosen[p];
        for (Index e = 0; e < E; ++e) {
          bool is_selected = false;
          for (Index p = selected[t]; p < selected[t + 1]; ++p) is_selected |= chosen[p] == e;
          if (!is_selected) out[n++] = static_cast<int>(e);
        }
      },
      T * E * E);
}

// db_e += sum over expert e's rows of src (rows, n): per expert and column,
// in row order. offsets (E + 1) are in backend memory; rows = offsets[E].
template <class B, class S>
void add_column_sums(const B& be, Index E, const Index* offsets, Index rows, const S* src, Index n,
                     S* db) {
  be.parallel_for_rows(
      E, n,
      [=] MOE_HOST_DEVICE(Index e, Index begin, Index end) {
        S* out = db + e * n;
        for (Index r = offsets[e]; r < offsets[e + 1]; ++r)
          for (Index j = begin; j < end; ++j) out[j] += src[r * n + j];
      },
      rows * n);
}

}  // namespace detail

template <class Router, class Estimator, class Backend, class Activation>
requires BackendPolicy<Backend> && RouterPolicy<Router, Backend> &&
    EstimatorPolicy<Estimator, Backend> && ActivationPolicy<Activation>
class Layer {
 public:
  using Scalar = typename Backend::Scalar;
  template <class U>
  using Buffer = typename Backend::template Buffer<U>;
  using Parameters = TensorBuffer<Scalar>;

  // GEMM1 output columns per hidden unit: gated activations read (gate, up).
  static constexpr Index kInputWidth = Activation::kGated ? 2 : 1;

  // Everything the backward needs from one forward. Reusable: a forward
  // resizes it to its batch (no allocation when the shape repeats).
  class Cache {
   public:
    const RoutingStats& stats() const { return stats_; }
    Index tokens() const { return tokens_; }
    // Each token's top-1 expert (-1 for a token with no expert): what the next
    // layer's AdaptiveCluster router takes as its previous assignment.
    std::span<const int> top1_assignment() const { return {top1_.data(), top1_.size()}; }
    bool filled() const { return filled_; }

   private:
    friend class Layer;
    bool filled_ = false;
    std::uint64_t owner_ = 0;  // the id of the layer that filled it
    Index tokens_ = 0, d_model_ = 0, d_ff_ = 0, experts_ = 0;
    Selection<Scalar, Backend::template Buffer> selection_;  // the router's A_t
    // Pairs the experts compute: the router's selection, or (estimators that
    // compute all experts) every expert per token, the selected ones first.
    Selection<Scalar, Backend::template Buffer> all_pairs_;
    Buffer<int> top1_;  // (T) each token's first-ranked selected expert, -1 if none
    typename Router::template Cache<Backend> router_;
    Dispatch<Backend::template Buffer> dispatch_;
    Buffer<Scalar> x_rows_;  // (rows, d)       inputs gathered by expert
    // (rows, w d_ff) GEMM1 output (+ b1), w = kInputWidth; after a training
    // forward, the activation's derivative (partials) times the dropout factor.
    Buffer<Scalar> pre_;
    bool derivatives_ = false;  // pre_ holds derivatives (see forward)
    Buffer<Scalar> hidden_;     // (rows, d_ff)    activation, after dropout
    Buffer<Scalar> out_rows_;   // (rows, d)       expert outputs E_i(x_t)
    std::uint64_t dropout_key_ = 0;
    double dropout_ = 0;  // the rate this forward used (0 in eval)
    RoutingStats stats_;
    // The state this forward used (after its EMA update): the backward of this
    // cache must see it even if other forwards or load_state() ran since.
    TensorBuffer<double> state_;
  };

  // Caches remember which layer filled them; copies get a new identity.
  class InstanceId {
   public:
    InstanceId() : value_(next()) {}
    InstanceId(const InstanceId&) : value_(next()) {}
    InstanceId& operator=(const InstanceId&) { return *this; }
    std::uint64_t value() const { return value_; }

   private:
    static std::uint64_t next() {
      static std::atomic<std::uint64_t> counter{0};
      return ++counter;
    }
    std::uint64_t value_;
  };

  Layer(const LayerConfig& config, Router router = {}, Estimator estimator = {},
        std::uint64_t seed = 0, Backend backend = Backend{})
      : config_(config),
        router_(std::move(router)),
        estimator_(std::move(estimator)),
        backend_(std::move(backend)),
        seed_(seed) {
    validate_config();
    auto layout = std::make_shared<TensorLayout>();
    router_.add_parameters(*layout, config_);
    const Index E = config_.experts, d = config_.d_model, h = config_.d_ff;
    layout->add("experts.w1", {E, d, kInputWidth * h});  // SwiGLU: [W1 | W3]
    if (config_.expert_bias) layout->add("experts.b1", {E, h});
    layout->add("experts.w2", {E, h, d});
    if (config_.expert_bias) layout->add("experts.b2", {E, d});
    params_ = Parameters(std::move(layout), backend_.memory_resource());
    auto state_layout = std::make_shared<TensorLayout>();
    state_layout->add("layer.train_forwards", {1});  // keys each training forward's dropout mask
    state_layout->add("layer.dropout_seed", {2});  // the seed's two 32-bit halves, exact in double
    if constexpr (requires { router_.add_state(*state_layout, config_); })
      router_.add_state(*state_layout, config_);
    estimator_.add_state(*state_layout, config_);
    state_ = TensorBuffer<double>(std::move(state_layout), backend_.memory_resource());
    state_["layer.dropout_seed"][0] = static_cast<double>(seed_ >> 32);
    state_["layer.dropout_seed"][1] = static_cast<double>(seed_ & 0xFFFFFFFFull);
    save_router_state();
    initialize();
  }

  // PyTorch nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights
  // and biases; the router initialises its own weights. Deterministic in seed.
  void initialize() {
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
  // until the backward of this cache.
  void forward(ConstMatrixView<Scalar> x, MatrixView<Scalar> y, Cache& cache, Mode mode,
               const ForwardContext& context = {}) {
    const Index T = x.rows(), d = config_.d_model, E = config_.experts, h = config_.d_ff;
    const Index wide = kInputWidth * h;
    detail::require(x.cols() == d, "moe::Layer::forward: x.cols()=", x.cols(),
                    ", expected d_model=", d);
    detail::require(T >= 1, "moe::Layer::forward: x.rows()=", T, ", expected at least 1 token");
    detail::require(y.rows() == T && y.cols() == d, "moe::Layer::forward: y is (", y.rows(), ", ",
                    y.cols(), "), expected (", T, ", ", d, ") like x");
    detail::require(x.data() != y.data(),
                    "moe::Layer::forward: y aliases x, expected separate buffers (x is read again "
                    "by backward)");
    check_finite("forward", "x", x);
    router_.validate(config_);  // runtime k may have changed since construction

    cache.filled_ = false;
    cache.owner_ = id_.value();
    cache.tokens_ = T;
    cache.d_model_ = d;
    cache.d_ff_ = h;
    cache.experts_ = E;
    auto& sel = cache.selection_;
    sel.tokens = T;
    sel.experts = E;
    router_.forward(backend_, mode, x, std::as_const(params_), context, sel, cache.router_);
    detail::write_top1(backend_, sel, cache.top1_);

    auto& dispatch = cache.dispatch_;
    const auto& computed = computed_pairs(cache);
    backend_.dispatch(computed, capacity(T), dispatch);
    const Index rows = dispatch.rows();
    cache.x_rows_.resize(static_cast<std::size_t>(rows * d));
    cache.pre_.resize(static_cast<std::size_t>(rows * wide));
    cache.hidden_.resize(static_cast<std::size_t>(rows * h));
    cache.out_rows_.resize(static_cast<std::size_t>(rows * d));

    // Gather each routed pair's input row.
    {
      const Scalar* xs = x.data();
      Scalar* x_rows = cache.x_rows_.data();
      const Index* row_pair = dispatch.row_pair.data();
      const Index* pair_token = dispatch.pair_token.data();
      backend_.parallel_for_rows(
          rows, d,
          [=] MOE_HOST_DEVICE(Index r, Index begin, Index end) {
            const Scalar* src = xs + pair_token[row_pair[r]] * d;
            Scalar* dst = x_rows + r * d;
            for (Index j = begin; j < end; ++j) dst[j] = src[j];
          },
          rows * d);
    }

    // Experts: GEMM1, activation (+ b1, dropout), GEMM2 (+ b2).
    const auto& offsets = dispatch.expert_offsets;
    backend_.grouped_gemm(offsets, false, wide, d, cache.x_rows_.data(),
                          params_["experts.w1"].data(), d * wide, Scalar(0), cache.pre_.data());
    cache.dropout_ = mode == Mode::train ? config_.dropout : 0.0;
    double& train_forwards = state_["layer.train_forwards"][0];
    cache.dropout_key_ =
        math::hash3(dropout_seed(), kDropoutSeedStream, static_cast<std::uint64_t>(train_forwards));
    if (mode == Mode::train) train_forwards += 1;
    // One pass over each hidden row: + b1, the activation, dropout. A training
    // forward also overwrites pre with the activation's derivative (partials
    // for a gated one) times the dropout factor, so that the backward is one
    // multiplication: no transcendental and no mask recomputed there.
    cache.derivatives_ = mode == Mode::train;
    {
      Scalar* pre = cache.pre_.data();
      Scalar* hidden = cache.hidden_.data();
      const int* row_expert = dispatch.row_expert.data();
      const Index* row_pair = dispatch.row_pair.data();
      const Scalar* b1 = config_.expert_bias ? params_["experts.b1"].data() : nullptr;
      const double rate = cache.dropout_;
      const std::uint64_t key = cache.dropout_key_;
      const Scalar keep_scale = static_cast<Scalar>(rate > 0 ? 1.0 / (1.0 - rate) : 1.0);
      const bool derivatives = cache.derivatives_;
      backend_.parallel_for_rows(
          rows, h,
          [=] MOE_HOST_DEVICE(Index r, Index begin, Index end) {
            Scalar* pr = pre + r * wide;
            Scalar* hr = hidden + r * h;
            if (b1 != nullptr) {
              const Scalar* be = b1 + row_expert[r] * h;
              for (Index j = begin; j < end; ++j) pr[j] += be[j];
            }
            if (derivatives) {
              // Value and derivative in place; the dropout factor, when there
              // is one, in a second loop, so this one has no branch per element.
              for (Index j = begin; j < end; ++j) {
                if constexpr (Activation::kGated) {
                  Scalar d_gate, d_up;
                  hr[j] = value_and_partials(pr[j], pr[h + j], d_gate, d_up);
                  pr[j] = d_gate;
                  pr[h + j] = d_up;
                } else {
                  Scalar derivative;
                  hr[j] = value_and_derivative(pr[j], derivative);
                  pr[j] = derivative;
                }
              }
              if (rate > 0) {  // the dropout factor, on the value and the derivative
                for (Index j = begin; j < end; ++j) {
                  const Scalar m = keeps(key, row_pair[r], j, rate) ? keep_scale : Scalar(0);
                  hr[j] *= m;
                  pr[j] *= m;
                  if constexpr (Activation::kGated) pr[h + j] *= m;
                }
              }
              return;
            }
            for (Index j = begin; j < end; ++j) {
              if constexpr (Activation::kGated) {
                hr[j] = Activation::value(pr[j], pr[h + j]);
              } else {
                hr[j] = Activation::value(pr[j]);
              }
            }
            if (rate > 0) {
              for (Index j = begin; j < end; ++j)
                hr[j] *= keeps(key, row_pair[r], j, rate) ? keep_scale : Scalar(0);
            }
          },
          rows * wide * 8);
    }
    backend_.grouped_gemm(offsets, false, d, h, cache.hidden_.data(), params_["experts.w2"].data(),
                          h * d, Scalar(0), cache.out_rows_.data());
    if (config_.expert_bias) {
      Scalar* out = cache.out_rows_.data();
      const int* row_expert = dispatch.row_expert.data();
      const Scalar* b2 = params_["experts.b2"].data();
      backend_.parallel_for_rows(
          rows, d,
          [=] MOE_HOST_DEVICE(Index r, Index begin, Index end) {
            const Scalar* be = b2 + row_expert[r] * d;
            for (Index j = begin; j < end; ++j) out[r * d + j] += be[j];
          },
          rows * d);
    }

    // Combine: each token sums its selected pairs in their fixed order (no
    // atomics). Selected pairs lead each token's computed pairs.
    {
      const Scalar* gates = sel.gates.data();
      const Index* selected = sel.token_offsets.data();
      const Index* token_offsets = computed.token_offsets.data();
      const int* pair_expert = computed.pair_expert.data();
      const Index* pair_row = dispatch.pair_row.data();
      const Scalar* out = cache.out_rows_.data();
      Scalar* ys = y.data();
      backend_.parallel_for_rows(
          T, d,
          [=] MOE_HOST_DEVICE(Index t, Index begin, Index end) {
            Scalar* yt = ys + t * d;
            for (Index j = begin; j < end; ++j) yt[j] = Scalar(0);
            const Index first = token_offsets[t], last = first + selected[t + 1] - selected[t];
            for (Index p = first; p < last; ++p) {
              const Index r = pair_row[p];
              if (r < 0) continue;  // dropped by capacity
              const Scalar g = gates[t * E + pair_expert[p]];
              const Scalar* o = out + r * d;
              for (Index j = begin; j < end; ++j) yt[j] += g * o[j];
            }
          },
          (rows + T) * d);
    }
    const auto batch = batch_of(cache);
    estimator_.update_state(backend_, mode, batch, state_);  // before use (Default MoE)
    estimator_.add_unselected_outputs(backend_, batch, std::as_const(state_), y.data());
    // The state this forward used, for the backward: copied by the backend
    // (on a GPU the EMA stays on the device) once the cache has the layout.
    if (cache.state_.same_layout(state_)) {
      const double* src = state_.flat().data();
      double* dst = cache.state_.flat().data();
      const Index n = static_cast<Index>(state_.size());
      backend_.parallel_for(
          n, [=] MOE_HOST_DEVICE(Index i) { dst[i] = src[i]; }, n);
    } else {
      cache.state_ = state_;
    }

    auto& stats = cache.stats_;
    stats.tokens_per_expert = dispatch.rows_per_expert;
    if constexpr (Estimator::kComputesAllExperts) {  // report the routed load, not the oracle's
      stats.tokens_per_expert.assign(static_cast<std::size_t>(E), 0);
      for (Index p = 0; p < sel.pairs(); ++p) ++stats.tokens_per_expert[sel.pair_expert[p]];
    }
    stats.selected_pairs = sel.pairs();
    stats.dropped_pairs = dispatch.dropped;
    stats.aux_loss = sel.aux_loss;
    stats.zero_gate_fraction =
        1.0 - static_cast<double>(sel.pairs()) / (static_cast<double>(T) * static_cast<double>(E));
    last_stats_ = stats;
    cache.filled_ = true;
  }

  // dx = dL/dx and grads += dL/dparameters for L = <dy, y> + aux_loss, where
  // y and aux_loss are those of the forward that filled `cache` with this x.
  void backward(ConstMatrixView<Scalar> x, const Cache& cache, ConstMatrixView<Scalar> dy,
                MatrixView<Scalar> dx, Parameters& grads) {
    const Index T = x.rows(), d = config_.d_model, E = config_.experts, h = config_.d_ff;
    const Index wide = kInputWidth * h;
    detail::require(cache.filled_,
                    "moe::Layer::backward: cache.filled()=false, expected a cache filled by "
                    "forward");
    detail::require(cache.d_model_ == d && cache.d_ff_ == h && cache.experts_ == E,
                    "moe::Layer::backward: cache from a layer with (d_model, d_ff, experts)=(",
                    cache.d_model_, ", ", cache.d_ff_, ", ", cache.experts_, "), expected (", d,
                    ", ", h, ", ", E, ")");
    detail::require(cache.owner_ == id_.value(), "moe::Layer::backward: cache filled by layer #",
                    cache.owner_, ", expected this layer #", id_.value(),
                    " (a copy of a layer is a new layer with its own caches)");
    detail::require(x.cols() == d, "moe::Layer::backward: x.cols()=", x.cols(),
                    ", expected d_model=", d);
    detail::require(T == cache.tokens_, "moe::Layer::backward: x.rows()=", T,
                    ", expected cache.tokens()=", cache.tokens_);
    detail::require(dy.rows() == T && dy.cols() == d, "moe::Layer::backward: dy is (", dy.rows(),
                    ", ", dy.cols(), "), expected (", T, ", ", d, ")");
    detail::require(dx.rows() == T && dx.cols() == d, "moe::Layer::backward: dx is (", dx.rows(),
                    ", ", dx.cols(), "), expected (", T, ", ", d, ")");
    detail::require(grads.same_layout(params_), "moe::Layer::backward: grads has size ",
                    grads.size(), " and another layout, expected layer.make_gradients() (size ",
                    params_.size(), ")");
    detail::require(grads.memory()->is_equal(*backend_.memory_resource()),
                    "moe::Layer::backward: grads lives in another memory than the ", Backend::kName,
                    " backend's, expected layer.make_gradients()");
    detail::require(dx.data() != x.data(),
                    "moe::Layer::backward: dx aliases x, expected separate buffers (x is read "
                    "after dx is written)");
    check_finite("backward", "dy", dy);

    const auto& sel = cache.selection_;
    const auto& computed = computed_pairs(cache);
    const auto& dispatch = cache.dispatch_;
    const Index rows = dispatch.rows();
    auto& ws = workspace_;
    ws.d_out.resize(static_cast<std::size_t>(rows * d));
    ws.d_hidden.resize(static_cast<std::size_t>(rows * h));
    ws.d_pre.resize(static_cast<std::size_t>(rows * wide));
    ws.d_x_rows.resize(static_cast<std::size_t>(rows * d));
    ws.d_gates.resize(static_cast<std::size_t>(T * E));
    ws.d_logits.resize(static_cast<std::size_t>(T * E));

    // Combine backward: dE_e(x_t) = G_te dy_t for the selected pairs (0 for
    // the oracle's others), per expert row; dG_te = <dy_t, E_e(x_t)> for every
    // computed pair that has a row, one sum each, and 0 for every other entry.
    {
      const Scalar* gates = sel.gates.data();
      const Index* selected = sel.token_offsets.data();
      const Index* token_offsets = computed.token_offsets.data();
      const int* pair_expert = computed.pair_expert.data();
      const Index* pair_row = dispatch.pair_row.data();
      const Index* pair_token = dispatch.pair_token.data();
      const Index* row_pair = dispatch.row_pair.data();
      const Scalar* out = cache.out_rows_.data();
      const Scalar* dys = dy.data();
      Scalar* d_out = ws.d_out.data();
      Scalar* d_gates = ws.d_gates.data();
      backend_.parallel_for_rows(
          rows, d,
          [=] MOE_HOST_DEVICE(Index r, Index begin, Index end) {
            const Index p = row_pair[r], t = pair_token[p];
            const bool is_selected = p < token_offsets[t] + selected[t + 1] - selected[t];
            const Scalar gate = is_selected ? gates[t * E + pair_expert[p]] : Scalar(0);
            const Scalar* g = dys + t * d;
            Scalar* dor = d_out + r * d;
            for (Index j = begin; j < end; ++j) dor[j] = gate * g[j];
          },
          rows * d);
      backend_.parallel_for(
          T * E, [=] MOE_HOST_DEVICE(Index i) { d_gates[i] = Scalar(0); }, T * E);
      backend_.parallel_sum_rows(
          computed.pairs(), d,
          [=] MOE_HOST_DEVICE(Index p, Index j) {
            const Index r = pair_row[p];
            return r < 0 ? Scalar(0) : dys[pair_token[p] * d + j] * out[r * d + j];
          },
          [=] MOE_HOST_DEVICE(Index p, Scalar dot) {
            if (pair_row[p] >= 0) d_gates[pair_token[p] * E + pair_expert[p]] = dot;
          },
          rows * d);
    }
    estimator_.add_unselected_gate_gradients(backend_, batch_of(cache), cache.state_, dy.data(),
                                             ws.d_gates.data());

    // Expert backward: GEMM2, activation, GEMM1, in reverse.
    const auto& offsets = dispatch.expert_offsets;
    const Scalar* w1 = params_["experts.w1"].data();
    const Scalar* w2 = params_["experts.w2"].data();
    backend_.grouped_gemm(offsets, true, h, d, ws.d_out.data(), w2, h * d, Scalar(0),
                          ws.d_hidden.data());  // dH = dO W2^T
    backend_.grouped_gemm_tn(offsets, h, d, cache.hidden_.data(), ws.d_out.data(),
                             grads["experts.w2"].data(), h * d);  // dW2 += H^T dO
    if (config_.expert_bias)
      detail::add_column_sums(backend_, E, dispatch.row_offsets.data(), rows, ws.d_out.data(), d,
                              grads["experts.b2"].data());
    {
      const Scalar* pre = cache.pre_.data();
      const Scalar* d_hidden = ws.d_hidden.data();
      Scalar* d_pre = ws.d_pre.data();
      const Index* row_pair = dispatch.row_pair.data();
      const double rate = cache.dropout_;
      const std::uint64_t key = cache.dropout_key_;
      const Scalar keep_scale = static_cast<Scalar>(rate > 0 ? 1.0 / (1.0 - rate) : 1.0);
      const bool derivatives = cache.derivatives_;
      backend_.parallel_for_rows(
          rows, h,
          [=] MOE_HOST_DEVICE(Index r, Index begin, Index end) {
            const Scalar* pr = pre + r * wide;
            const Scalar* dhr = d_hidden + r * h;
            Scalar* dpr = d_pre + r * wide;
            if (derivatives) {  // pre holds the forward's derivatives (dropout included)
              for (Index j = begin; j < end; ++j) {
                dpr[j] = dhr[j] * pr[j];
                if constexpr (Activation::kGated) dpr[h + j] = dhr[j] * pr[h + j];
              }
              return;
            }
            for (Index j = begin; j < end; ++j) {
              Scalar dh = dhr[j];
              if (rate > 0) dh *= keeps(key, row_pair[r], j, rate) ? keep_scale : Scalar(0);
              if constexpr (Activation::kGated) {
                Scalar d_gate, d_up;
                Activation::partials(pr[j], pr[h + j], d_gate, d_up);
                dpr[j] = dh * d_gate;
                dpr[h + j] = dh * d_up;
              } else {
                dpr[j] = dh * Activation::derivative(pr[j]);
              }
            }
          },
          rows * wide * 2);
    }
    backend_.grouped_gemm_tn(offsets, d, wide, cache.x_rows_.data(), ws.d_pre.data(),
                             grads["experts.w1"].data(), d * wide);  // dW1 += X^T dPre
    if (config_.expert_bias)
      detail::add_column_sums(backend_, E, dispatch.row_offsets.data(), rows, ws.d_pre.data(), h,
                              grads["experts.b1"].data());
    backend_.grouped_gemm(offsets, true, d, wide, ws.d_pre.data(), w1, d * wide, Scalar(0),
                          ws.d_x_rows.data());  // dX_rows = dPre W1^T

    // dx_t: each token sums its pairs' input gradients in its fixed order
    // (the oracle's unselected pairs have zero input gradient).
    {
      const Index* token_offsets = computed.token_offsets.data();
      const Index* pair_row = dispatch.pair_row.data();
      const Scalar* d_x_rows = ws.d_x_rows.data();
      Scalar* dxs = dx.data();
      backend_.parallel_for_rows(
          T, d,
          [=] MOE_HOST_DEVICE(Index t, Index begin, Index end) {
            Scalar* dxt = dxs + t * d;
            for (Index j = begin; j < end; ++j) dxt[j] = Scalar(0);
            for (Index p = token_offsets[t]; p < token_offsets[t + 1]; ++p) {
              const Index r = pair_row[p];
              if (r < 0) continue;
              const Scalar* src = d_x_rows + r * d;
              for (Index j = begin; j < end; ++j) dxt[j] += src[j];
            }
          },
          (rows + T) * d);
    }
    // The router adds its own dL/dx and parameter gradients (aux loss included).
    router_.backward(backend_, x, std::as_const(params_), sel, cache.router_, ws.d_gates.data(),
                     dx.data(), grads, ws.d_logits.data());
  }

  // Called once after each optimiser step with the number of steps done:
  // stateful policies (k schedules, the ReLU router's lambda) advance here.
  void end_step(std::uint64_t step) {
    if constexpr (requires { router_.end_step(step); }) router_.end_step(step);
    save_router_state();
  }

  // Non-parameter state (no gradient), one flat buffer with named views:
  // "layer.train_forwards", the estimator's "estimator.ema", the router's
  // ("router.lambda", "router.step"). Together with parameters() it restores
  // training exactly: save both between steps, restore with load_state().
  const TensorBuffer<double>& state() const { return state_; }
  TensorBuffer<double>& state() { return state_; }

  // Replaces the state (e.g. from a checkpoint) and hands policies their part
  // back (the shared lambda, the schedule's k). Strong guarantee: everything
  // is checked, and the policies take their part, before the state changes,
  // so on an error the layer is unchanged (policies validate before they
  // change anything).
  void load_state(const TensorBuffer<double>& state) {
    constexpr const char* where = "moe::Layer::load_state";
    detail::require(state.same_layout(state_), where, ": a state of size ", state.size(),
                    " with another layout, expected this layer's (size ", state_.size(), ")");
    detail::require_whole(state["layer.train_forwards"][0], 53, where, "layer.train_forwards");
    detail::require_whole(state["layer.dropout_seed"][0], 32, where, "layer.dropout_seed[0]");
    detail::require_whole(state["layer.dropout_seed"][1], 32, where, "layer.dropout_seed[1]");
    if constexpr (requires { router_.restore(state); }) router_.restore(state);
    std::copy(state.flat().begin(), state.flat().end(), state_.flat().begin());
  }

  // A zero gradient buffer with the parameters' layout.
  Parameters make_gradients() const { return params_.zeros_like(); }

  Parameters& parameters() { return params_; }
  const Parameters& parameters() const { return params_; }
  const LayerConfig& config() const { return config_; }
  Router& router() { return router_; }
  const Router& router() const { return router_; }
  const Estimator& estimator() const { return estimator_; }
  const Backend& backend() const { return backend_; }
  // Statistics of the latest forward (each cache also keeps its own).
  const RoutingStats& last_stats() const { return last_stats_; }

  // Pairs one expert may take: ceil(c T k / E), or -1 when dropless. Never
  // more than T pairs can reach one expert, which also bounds huge factors.
  Index capacity(Index tokens) const {
    if (config_.capacity_factor <= 0) return -1;
    const double pairs =
        std::ceil(config_.capacity_factor * static_cast<double>(tokens) *
                  static_cast<double>(router_.nominal_k()) / static_cast<double>(config_.experts));
    return pairs >= static_cast<double>(tokens) ? tokens : static_cast<Index>(pairs);
  }

 private:
  static constexpr std::uint64_t kRouterSeedStream = 1;
  static constexpr std::uint64_t kExpertSeedStream = 2;
  static constexpr std::uint64_t kDropoutSeedStream = 3;

  struct Workspace {
    Buffer<Scalar> d_out, d_hidden, d_pre, d_x_rows, d_gates, d_logits;
  };

  // The activation's value and derivative (partials) in one call, from the
  // policy's fused function where it has one.
  MOE_HOST_DEVICE static Scalar value_and_derivative(Scalar u, Scalar& derivative) requires(
      !Activation::kGated) {
    if constexpr (requires { Activation::value_and_derivative(u, derivative); }) {
      return Activation::value_and_derivative(u, derivative);
    } else {
      derivative = Activation::derivative(u);
      return Activation::value(u);
    }
  }
  MOE_HOST_DEVICE static Scalar value_and_partials(Scalar gate, Scalar up, Scalar& d_gate,
                                                   Scalar& d_up) requires(Activation::kGated) {
    if constexpr (requires { Activation::value_and_partials(gate, up, d_gate, d_up); }) {
      return Activation::value_and_partials(gate, up, d_gate, d_up);
    } else {
      Activation::partials(gate, up, d_gate, d_up);
      return Activation::value(gate, up);
    }
  }

  // Dropout keeps unit j of pair p with probability 1 - rate; a pure function
  // of (key, pair, j), so backward recomputes the forward's mask exactly.
  MOE_HOST_DEVICE static bool keeps(std::uint64_t key, Index pair, Index j, double rate) {
    return math::uniform01(key, static_cast<std::uint64_t>(pair), static_cast<std::uint64_t>(j)) >=
           rate;
  }

  // From the state, so that a restored checkpoint draws the same masks.
  std::uint64_t dropout_seed() const {
    const auto halves = state_["layer.dropout_seed"];
    return (static_cast<std::uint64_t>(halves[0]) << 32) | static_cast<std::uint64_t>(halves[1]);
  }

  void save_router_state() {
    if constexpr (requires { router_.save_state(state_); }) router_.save_state(state_);
  }

  void validate_config() const {
    const auto& c = config_;
    detail::require(c.d_model >= 1, "moe::Layer: d_model=", c.d_model, ", expected >= 1");
    detail::require(c.d_ff >= 1, "moe::Layer: d_ff=", c.d_ff, ", expected >= 1");
    detail::require(c.experts >= 1, "moe::Layer: experts=", c.experts, ", expected >= 1");
    detail::require(!c.expert_bias || Activation::kSupportsBias, "moe::Layer: expert_bias=true, ",
                    "expected false for activation ", Activation::kName, " (it has no biases)");
    detail::require(std::isfinite(c.dropout) && c.dropout >= 0 && c.dropout < 1,
                    "moe::Layer: dropout=", c.dropout, ", expected 0 <= dropout < 1");
    detail::require(std::isfinite(c.capacity_factor) && c.capacity_factor >= 0,
                    "moe::Layer: capacity_factor=", c.capacity_factor,
                    ", expected 0 (dropless) or a positive finite value");
    router_.validate(c);
    estimator_.validate(c);
  }

  void check_finite(const char* where, const char* name, ConstMatrixView<Scalar> m) const {
    if (!config_.check_finite) return;
    const Index bad = backend_.first_non_finite(m.data(), m.size());
    if (bad < 0) return;
    Scalar value;
    backend_.copy_to_host(&value, m.data() + bad, 1);  // m may be device memory
    throw Error(detail::concat("moe::Layer::", where, ": ", name, "(", bad / m.cols(), ", ",
                               bad % m.cols(), ")=", value,
                               " is not finite, expected finite values (check_finite=true)"));
  }

  void fill_uniform(const char* name, double bound, std::uint64_t stream) {
    auto values = params_[name];
    const std::uint64_t key = math::hash3(seed_, kExpertSeedStream, stream);
    for (std::size_t i = 0; i < values.size(); ++i)
      values[i] = static_cast<Scalar>(bound * (2.0 * math::uniform01(key, 0, i) - 1.0));
  }

  EstimatorBatch<Scalar> batch_of(const Cache& cache) const {
    EstimatorBatch<Scalar> b;
    b.tokens = cache.tokens_;
    b.experts = config_.experts;
    b.d_model = config_.d_model;
    b.gates = cache.selection_.gates.data();
    b.token_offsets = cache.selection_.token_offsets.data();
    b.pair_expert = cache.selection_.pair_expert.data();
    b.expert_offsets = cache.dispatch_.row_offsets.data();
    b.rows = cache.dispatch_.rows();
    b.row_token = cache.dispatch_.row_token.data();
    b.expert_out = cache.out_rows_.data();
    return b;
  }

  // The pairs the experts compute (see Cache::all_pairs_).
  const Selection<Scalar, Backend::template Buffer>& computed_pairs(Cache& cache) const {
    if constexpr (!Estimator::kComputesAllExperts) {
      return cache.selection_;
    } else {
      detail::all_expert_pairs(backend_, cache.selection_, cache.all_pairs_);
      return cache.all_pairs_;
    }
  }
  const Selection<Scalar, Backend::template Buffer>& computed_pairs(const Cache& cache) const {
    return Estimator::kComputesAllExperts ? cache.all_pairs_ : cache.selection_;
  }

  InstanceId id_;
  LayerConfig config_;
  Router router_;
  Estimator estimator_;
  Backend backend_;
  std::uint64_t seed_ = 0;
  TensorBuffer<double> state_;  // non-parameter state: counters, estimator buffers, ...
  Parameters params_;
  Workspace workspace_;
  RoutingStats last_stats_;
};

}  // namespace moe
