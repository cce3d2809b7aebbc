#pragma once
// LayerCache: everything one forward keeps for its backward, and the scratch
// of that backward. One cache per micro-batch in flight; reusable (a forward
// resizes it to its batch, with no allocation when the shape repeats).
// Because all per-batch memory lives here and not in the layer or the
// backend, one layer serves several caches at once: concurrent eval
// forwards from several threads, and micro-batches in flight.

#include <cstdint>
#include <span>

#include "moe/core/routing.hpp"
#include "moe/core/tensor_buffer.hpp"
#include "moe/layer/expert_ffn.hpp"

namespace moe {

template <class Router, class Backend, class Dispatcher>
class LayerCache;

namespace detail {

// The cache's contents. Plain data, written by the layer only (through
// CacheAccess); users read a cache through LayerCache's accessors.
template <class Router, class Backend, class Dispatcher>
struct LayerCacheData {
  using S = typename Backend::Scalar;
  template <class U>
  using Buffer = typename Backend::template Buffer<U>;

  bool filled = false;
  std::uint64_t owner = 0;  // the id of the layer that filled it
  Index tokens = 0, d_model = 0, d_ff = 0, experts = 0;

  Selection<S, Backend::template Buffer> selection;  // the router's A_t and gates
  // Pairs the experts compute: the selection, or (estimators that compute
  // every expert) every expert per token, the selected ones first.
  Selection<S, Backend::template Buffer> all_pairs;
  Buffer<int> top1;  // (T) each token's first-ranked selected expert, -1 if none
  typename Router::template Cache<Backend> router;
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
  template <class R, class B, class D>
  static LayerCacheData<R, B, D>& data(LayerCache<R, B, D>& cache) {
    return cache.data_;
  }
  template <class R, class B, class D>
  static const LayerCacheData<R, B, D>& data(const LayerCache<R, B, D>& cache) {
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

}  // namespace detail

template <class Router, class Backend, class Dispatcher>
class LayerCache {
 public:
  // Whether a forward filled it (a forward that threw leaves it unfilled).
  bool filled() const { return data_.filled; }
  Index tokens() const { return data_.tokens; }
  // What the forward reports about routing.
  const RoutingStats& stats() const { return data_.stats; }
  // Each token's top-1 expert (-1 for a token with no expert): what the next
  // layer's AdaptiveCluster router takes as its previous assignment.
  std::span<const int> top1_assignment() const { return {data_.top1.data(), data_.top1.size()}; }

 private:
  friend struct detail::CacheAccess;
  detail::LayerCacheData<Router, Backend, Dispatcher> data_;
};

}  // namespace moe
