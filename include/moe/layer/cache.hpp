#pragma once
// LayerCache: everything one forward keeps for its backward, and the scratch
// of that backward. One cache per micro-batch in flight; reusable (a forward
// resizes it to its batch, with no allocation when the shape repeats).
// Because all per-batch memory lives here and not in the layer or the
// backend, one layer serves several caches at once: concurrent eval
// forwards from several threads, and micro-batches in flight.

#include <cstdint>
#include <span>
#include <vector>

#include "moe/core/concepts/estimator.hpp"
#include "moe/core/config.hpp"
#include "moe/core/error.hpp"
#include "moe/core/process_group.hpp"
#include "moe/core/routing.hpp"
#include "moe/core/tensor_buffer.hpp"
#include "moe/core/view.hpp"
#include "moe/layer/expert_ffn.hpp"

namespace moe {

template <class Router, class Estimator, class Backend, class Dispatcher>
class LayerCache;

namespace detail {

// The cache's contents. Plain data, written by the layer only (through
// CacheAccess); users read a cache through LayerCache's accessors.
template <class Router, class Estimator, class Backend, class Dispatcher>
struct LayerCacheData {
  using S = typename Backend::Scalar;
  template <class U>
  using Buffer = typename Backend::template Buffer<U>;

  bool filled = false;
  bool backward_done = false;  // a backward ran on this forward (its gradients are readable)
  std::uint64_t owner = 0;     // the id of the layer that filled it
  std::uint64_t parameters_version = 0;  // the layer's parameters as this forward saw them
  Index tokens = 0, d_model = 0, d_ff = 0, experts = 0;

  Selection<S, Backend::template Buffer> selection;  // the router's A_t and gates
  // Pairs the experts compute: the selection, or (estimators that compute
  // every expert) every expert per token, the selected ones first.
  Selection<S, Backend::template Buffer> all_pairs;
  Buffer<int> top1;  // (T) each token's first-ranked selected expert, -1 if none
  typename Router::template Cache<Backend> router;
  typename Estimator::template Cache<Backend> estimator;
  typename Dispatcher::template Cache<Backend> dispatch;

  // Rows (rows, d) on the tokens' side of the dispatch, and their experts'
  // side where that is another buffer (see DispatchPolicy::experts_side).
  Buffer<S> x_rows, x_rows_at_experts;      // inputs gathered by expert
  Buffer<S> out_rows, out_rows_at_experts;  // expert outputs E_i(x_t)
  ExpertActivations<Backend> activations;

  RoutingStats stats;
  // The state this forward used (after its EMA update): the backward of this
  // cache must see it even if other forwards or load_state() ran since.
  TensorBuffer<double> state;

  // The backward's scratch.
  struct Workspace {
    Buffer<S> d_out, d_out_at_experts;        // (rows, d) dL/dE_i(x_t)
    Buffer<S> d_x_rows, d_x_rows_at_experts;  // (rows, d) dL/dx of each row
    Buffer<S> d_gates, d_logits;              // (T, E)
    ExpertScratch<Backend> experts;
  } workspace;
};

// The layer's way into a cache.
struct CacheAccess {
  template <class R, class E, class B, class D>
  static LayerCacheData<R, E, B, D>& data(LayerCache<R, E, B, D>& cache) {
    return cache.data_;
  }
  template <class R, class E, class B, class D>
  static const LayerCacheData<R, E, B, D>& data(const LayerCache<R, E, B, D>& cache) {
    return cache.data_;
  }
};

// kept = state: the state a forward used, for its backward. Copied by the
// backend (on a GPU the EMA stays on the device) once kept has the layout.
template <class B>
void keep_state(const B& be, const TensorBuffer<double>& state, TensorBuffer<double>& kept) {
  if (!kept.same_layout(state)) {
    kept = state;
    return;
  }
  const double* src = state.flat().data();
  double* dst = kept.flat().data();
  const Index n = state.size();
  be.parallel_for(
      n, [=] MOE_HOST_DEVICE(Index i) { dst[i] = src[i]; }, n);
}

// c.stats from a forward's selection and dispatch: the routing statistics
// of this process's tokens.
template <class Estimator, class CacheData>
void record_stats(const LayerConfig& config, CacheData& c) {
  const Index T = c.tokens, E = config.experts;
  const auto& sel = c.selection;
  auto& stats = c.stats;
  stats.tokens_per_expert = c.dispatch.tokens().rows_per_expert;
  stats.routed_per_expert = c.dispatch.tokens().selected_per_expert;
  if constexpr (Estimator::kComputesAllExperts) {  // report the routed load, not the oracle's
    stats.tokens_per_expert.assign(static_cast<std::size_t>(E), 0);
    for (Index p = 0; p < sel.pairs(); ++p) ++stats.tokens_per_expert[sel.pair_expert[p]];
    stats.routed_per_expert = stats.tokens_per_expert;  // no capacity with the oracle
  }
  stats.selected_pairs = sel.pairs();
  stats.dropped_pairs = c.dispatch.tokens().dropped;
  stats.aux_loss = sel.aux_loss;
  stats.load_balance_loss = sel.load_balance_loss;
  stats.z_loss = sel.z_loss;
  stats.l1_loss = sel.l1_loss;
  stats.zero_gate_fraction =
      1.0 - static_cast<double>(sel.pairs()) / (static_cast<double>(T) * static_cast<double>(E));
}

// What the estimator sees of a forward: the gates, the pairs, each row's
// output on the tokens' side, and the processes of the batch.
template <class CacheData>
auto estimator_batch(const CacheData& c, const ProcessGroup& group) {
  const auto& tokens = c.dispatch.tokens();
  EstimatorBatch<typename CacheData::S> b;
  b.tokens = c.tokens;
  b.experts = c.experts;
  b.d_model = c.d_model;
  b.gates = c.selection.gates.data();
  b.probabilities =
      c.selection.probabilities.size() > 0 ? c.selection.probabilities.data() : nullptr;
  b.token_offsets = c.selection.token_offsets.data();
  b.pair_expert = c.selection.pair_expert.data();
  b.expert_offsets = tokens.row_offsets.data();
  b.rows = tokens.rows();
  b.row_token = tokens.row_token.data();
  b.expert_out = c.out_rows.data();
  b.group = &group;
  return b;
}

}  // namespace detail

// A forward's results, read-only, in the layouts of docs/layer.md. Views
// point into the cache (backend memory: on a GPU, managed memory the host
// can read once the forward returned); they stay valid until the cache's
// next forward. T tokens, E experts, P selected pairs.
template <class Router, class Estimator, class Backend, class Dispatcher>
class LayerCache {
 public:
  using Scalar = typename Backend::Scalar;

  // Whether a forward filled it (a forward that threw leaves it unfilled).
  bool filled() const { return data_.filled; }
  Index tokens() const { return data_.tokens; }
  Index experts() const { return data_.experts; }
  // Counts, losses and sparsity of the forward (RoutingStats).
  const RoutingStats& stats() const { return data_.stats; }

  // (T, E) the router's logits z.
  ConstMatrixView<Scalar> logits() const { return matrix(data_.selection.logits); }
  // (T, E) p = softmax(z) over all E; (0, 0) for a router without one (ReLU).
  ConstMatrixView<Scalar> probabilities() const { return matrix(data_.selection.probabilities); }
  // (T, E) the gates G: on each token's selection the weights of the combine;
  // off it the dense gates G~ an estimator may use (docs/algorithms.md 4).
  ConstMatrixView<Scalar> gates() const { return matrix(data_.selection.gates); }

  // The selection as CSR over tokens: token t's experts, best first, are
  // selected_experts()[selection_offsets()[t] .. selection_offsets()[t + 1]).
  std::span<const Index> selection_offsets() const {
    require_filled("selection_offsets()");
    return {data_.selection.token_offsets.data(), data_.selection.token_offsets.size()};
  }
  std::span<const int> selected_experts() const {
    require_filled("selected_experts()");
    return {data_.selection.pair_expert.data(), data_.selection.pair_expert.size()};
  }
  // Token t's selected experts, best first.
  std::span<const int> selected_experts(Index t) const {
    detail::require(data_.filled && t >= 0 && t < data_.tokens,
                    "moe::LayerCache::selected_experts: t=", t,
                    ", expected 0 <= t < tokens()=", data_.tokens, " of a filled cache");
    const Index* offsets = data_.selection.token_offsets.data();
    return selected_experts().subspan(static_cast<std::size_t>(offsets[t]),
                                      static_cast<std::size_t>(offsets[t + 1] - offsets[t]));
  }
  // Each token's top-1 expert (-1 for a token with no expert): what the next
  // layer's AdaptiveCluster router takes as its previous assignment.
  std::span<const int> top1_assignment() const { return {data_.top1.data(), data_.top1.size()}; }

  // Per selected pair (in selected_experts() order): 1 when the capacity
  // limit kept it, 0 when it dropped it. Computed when asked.
  std::vector<std::uint8_t> kept_mask() const {
    require_filled("kept_mask()");
    const auto& sel = data_.selection;
    const auto& computed = Estimator::kComputesAllExperts ? data_.all_pairs : sel;
    const auto& pair_row = data_.dispatch.tokens().pair_row;
    std::vector<std::uint8_t> kept(static_cast<std::size_t>(sel.pairs()));
    for (Index t = 0; t < data_.tokens; ++t) {
      const Index first = sel.token_offsets[t], computed_first = computed.token_offsets[t];
      for (Index i = 0; i < sel.token_offsets[t + 1] - first; ++i)
        kept[static_cast<std::size_t>(first + i)] = pair_row[computed_first + i] >= 0 ? 1 : 0;
    }
    return kept;
  }

  // The router's own cache: for AdaptiveCluster the cluster statistics
  // (count, mean, mad, weights, cap, clamped, scales; see its header).
  const typename Router::template Cache<Backend>& router_cache() const { return data_.router; }
  // The estimator's: for DefaultEMA the batch means m_i and which experts'
  // EMA moved (batch_mean, updated).
  const typename Estimator::template Cache<Backend>& estimator_cache() const {
    return data_.estimator;
  }
  // The dispatcher's: the pairs grouped by expert (tokens(), experts()); for
  // experts over processes also the rows sent to and received from each
  // process (sent_rows(), received_rows()).
  const typename Dispatcher::template Cache<Backend>& dispatch_cache() const {
    return data_.dispatch;
  }

  // After a backward of this forward: (T, E) dL/dG, the combine's entries and
  // the estimator's (DefaultEMA's and DenseExact's entries off the
  // selection), and (T, E) dL/dz, the router's logits' gradient (its losses
  // included).
  ConstMatrixView<Scalar> gate_gradients() const {
    require_backward("gate_gradients");
    return matrix(data_.workspace.d_gates);
  }
  ConstMatrixView<Scalar> logit_gradients() const {
    require_backward("logit_gradients");
    return matrix(data_.workspace.d_logits);
  }

 private:
  friend struct detail::CacheAccess;

  template <class Buffer>
  ConstMatrixView<Scalar> matrix(const Buffer& b) const {
    require_filled("a (T, E) view");
    return b.size() == 0 ? ConstMatrixView<Scalar>(nullptr, 0, 0)
                         : ConstMatrixView<Scalar>(b.data(), data_.tokens, data_.experts);
  }
  // The views read the last forward: a cache that no forward filled (or
  // whose forward threw) has none to read.
  void require_filled(const char* what) const {
    detail::require(data_.filled, "moe::LayerCache: ", what,
                    " of a cache that no forward filled (cache.filled()=false), expected a "
                    "forward first");
  }
  void require_backward(const char* what) const {
    detail::require(data_.backward_done, "moe::LayerCache::", what,
                    ": no backward has run on this cache's forward, expected layer.backward(x, "
                    "cache, ...) first");
  }

  detail::LayerCacheData<Router, Estimator, Backend, Dispatcher> data_;
};

}  // namespace moe
