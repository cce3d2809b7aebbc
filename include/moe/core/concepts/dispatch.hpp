#pragma once
#include <concepts>
#include <utility>

#include "moe/core/concepts/backend.hpp"
#include "moe/core/process_group.hpp"
#include "moe/core/routing.hpp"

namespace moe {

// The experts a process holds: [first, first + count) of the layer's E.
struct ExpertRange {
  Index first = 0;
  Index count = 0;
};

// A dispatch policy moves a batch's rows between its tokens and the experts
// that compute them (see moe/dispatch/). plan() decides, from the pairs the
// experts compute and the capacity, which rows go to which expert in which
// order, into the policy's per-batch Cache:
//  - cache.tokens(): the tokens' side, this process's pairs grouped by
//    expert (pair_row, pair_token, the counts), which the gather and the
//    combine read;
//  - cache.experts(): the experts' side, the rows the experts of this
//    process compute (expert_offsets, row_offsets, row_expert, and row_pair,
//    which keys the dropout mask), which the expert FFN reads.
// Rows move in buffers of `width` values per row. experts_side(rows, spare)
// names the buffer that holds the experts' side of `rows`: `rows` itself
// where both sides are one (one process), else `spare`. to_experts() fills
// the experts' side from the tokens' side, to_tokens() the reverse; each
// sizes its destination.
//
// group() is the processes whose tokens make up a batch (one process for
// dispatch::Local); routers and estimators sum their statistics over it, and
// the capacity counts its tokens. local_experts(E) is the range of experts
// this process holds: the layer's expert tensors hold those alone, and the
// experts' side numbers them from 0. A dispatcher over processes keys each
// row's dropout by a pair index unique over the group (row_pair), agrees
// on the capacity over the group, and makes its collective calls in one
// order on every process.
template <class D, class B>
concept DispatchPolicy = BackendPolicy<B> &&
    requires(const D& d, const B& be,
             const Selection<typename B::Scalar, B::template Buffer>& pairs, Index capacity,
             typename D::template Cache<B>& cache,
             typename B::template Buffer<typename B::Scalar>& rows,
             typename B::template Buffer<typename B::Scalar>& spare, Index width) {
  { D::kName } -> std::convertible_to<const char*>;
  { d.group() } -> std::convertible_to<const ProcessGroup&>;
  { d.local_experts(capacity) } -> std::same_as<ExpertRange>;
  d.plan(be, pairs, capacity, cache);
  { std::as_const(cache).tokens() } -> std::same_as<const Dispatch<B::template Buffer>&>;
  { std::as_const(cache).experts() } -> std::same_as<const Dispatch<B::template Buffer>&>;
  { d.experts_side(rows, spare) } -> std::same_as<typename B::template Buffer<typename B::Scalar>&>;
  d.to_experts(be, std::as_const(cache), std::as_const(rows), spare, width);
  d.to_tokens(be, std::as_const(cache), std::as_const(spare), rows, width);
};

}  // namespace moe
