#pragma once
#include <concepts>
#include <utility>

#include "moe/core/concepts/backend.hpp"
#include "moe/core/routing.hpp"

namespace moe {

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
// A dispatcher over processes (experts sharded by an all-to-all) needs more
// than this, and will add it here: the range of experts a process holds
// (which the parameters' layout and the expert weights follow), a sum over
// processes for the routers' and estimators' per-expert terms, dropout keys
// that are unique across processes, a capacity agreed across processes, and
// one order of collective calls on every process.
template <class D, class B>
concept DispatchPolicy = BackendPolicy<B> &&
    requires(const D& d, const B& be,
             const Selection<typename B::Scalar, B::template Buffer>& pairs, Index capacity,
             typename D::template Cache<B>& cache,
             typename B::template Buffer<typename B::Scalar>& rows,
             typename B::template Buffer<typename B::Scalar>& spare, Index width) {
  { D::kName } -> std::convertible_to<const char*>;
  d.plan(be, pairs, capacity, cache);
  { std::as_const(cache).tokens() } -> std::same_as<const Dispatch<B::template Buffer>&>;
  { std::as_const(cache).experts() } -> std::same_as<const Dispatch<B::template Buffer>&>;
  { d.experts_side(rows, spare) } -> std::same_as<typename B::template Buffer<typename B::Scalar>&>;
  d.to_experts(be, std::as_const(cache), std::as_const(rows), spare, width);
  d.to_tokens(be, std::as_const(cache), std::as_const(spare), rows, width);
};

}  // namespace moe
