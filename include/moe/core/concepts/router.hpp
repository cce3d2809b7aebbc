#pragma once
#include <concepts>
#include <cstdint>

#include "moe/core/concepts/backend.hpp"
#include "moe/core/context.hpp"
#include "moe/core/tensor_buffer.hpp"

namespace moe {

// A router (docs/algorithms.md section 3): owns its parameters in the layer's
// flat buffer, fills a Selection (gates for every (t, e), the selected pairs
// and its aux loss) in forward, and in backward maps dL/dG for every (t, e) to
// dL/dx (accumulated) and its parameter gradients, including its aux loss
// gradient.
//
// check_context(context, tokens, cfg) refuses, before the forward touches
// any cache, a ForwardContext the router cannot use (AdaptiveCluster's
// previous assignment of the wrong length or range); routers that take
// nothing from the context accept any.
//
// Its run state (the ReLU router's lambda, a k schedule's step) is part of
// the protocol, and every router spells out all four hooks, empty where it
// has no state, so that a misspelt hook is a compile error, never a hook
// silently skipped:
//  - add_state(layout, cfg): the tensors of its state in the layer's state
//    buffer;
//  - save_state(state): writes its current values there (after construction
//    and after every step);
//  - restore(state): takes them back (load_state), after checking them, and
//    changes nothing when they are bad;
//  - end_step(steps): called after each optimiser step.
template <class R, class B>
concept RouterPolicy = BackendPolicy<B> &&
    requires(const R& r, R& mutable_r, const B& be, const LayerConfig& cfg, TensorLayout& layout,
             TensorBuffer<typename B::Scalar>& params, TensorBuffer<double>& state, Mode mode,
             ConstMatrixView<typename B::Scalar> x, const ForwardContext& ctx,
             Selection<typename B::Scalar, B::template Buffer>& sel,
             typename R::template Cache<B>& cache, const typename B::Scalar* dgates,
             typename B::Scalar* dx, typename B::Scalar* scratch) {
  { R::kName } -> std::convertible_to<const char*>;
  r.validate(cfg);  // throws moe::Error on bad options
  // throws moe::Error on a context it cannot use, before any work
  r.check_context(ctx, Index{1}, cfg);
  { r.nominal_k() } -> std::convertible_to<Index>;
  r.add_parameters(layout, cfg);
  r.init(params, cfg, std::uint64_t{0});
  r.forward(be, mode, x, std::as_const(params), ctx, sel, cache);
  r.backward(be, x, std::as_const(params), std::as_const(sel), std::as_const(cache), dgates, dx,
             params, scratch);
  r.add_state(layout, cfg);
  r.save_state(state);
  mutable_r.restore(std::as_const(state));
  mutable_r.end_step(std::uint64_t{0});
};

}  // namespace moe
