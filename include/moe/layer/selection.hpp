#pragma once
// What the layer derives from a router's selection A_t: each token's top-1
// expert (the next ACMoE layer's clusters) and the pairs the experts compute
// (the selection itself, or every expert per token for an estimator that
// needs them all, such as DenseExact).

#include "moe/core/concepts/backend.hpp"
#include "moe/core/routing.hpp"

namespace moe::detail {

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

// Every expert for every token, the selected ones first in their order.
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

}  // namespace moe::detail
