#pragma once
// The result of routing one batch, in the backend's memory. Routers fill
// Selection; the backend's dispatch turns it into Dispatch. The CPU loops, the
// CUDA kernels and (later) the expert-parallel all-to-all all read these.

#include <vector>

#include "moe/core/config.hpp"

namespace moe {

// A router's result for one batch: its logits, probabilities and gates for
// every (token, expert), which experts run on which token (CSR over tokens,
// "pairs" in token order, each token's best first), and its loss terms.
template <class S, template <class> class Buffer>
struct Selection {
  Index tokens = 0;
  Index experts = 0;
  Buffer<S> logits;  // (T, E) z
  // (T, E) p = softmax(z) over all E; empty for a router without one (ReLU).
  Buffer<S> probabilities;
  // (T, E) G_te on the selection; off it, the dense gate G~_te that an
  // estimator may use for an unselected expert (TopK's plain and
  // renormalised gates: p; 0 for ReLU gates and a softmax over the selected).
  Buffer<S> gates;
  Buffer<Index> token_offsets;  // (T + 1) pairs of token t are [offsets[t], offsets[t+1])
  Buffer<int> pair_expert;      // (P) expert of each pair, in the token's fixed order
  // The router's training losses (docs/algorithms.md 3.1, 3.2), 0 in eval:
  double load_balance_loss = 0;  // Switch's aux_coef term
  double z_loss = 0;             // ST-MoE's z_coef term
  double l1_loss = 0;            // ReMoE's L1 term
  double aux_loss = 0;           // their sum: what the backward differentiates
  Index pairs() const { return static_cast<Index>(pair_expert.size()); }
};

// Pairs grouped by expert (counting sort, token order inside an expert), after
// the optional capacity limit.
template <template <class> class Buffer>
struct Dispatch {
  std::vector<Index> expert_offsets;       // (E + 1) host: rows of expert e are [off[e], off[e+1])
  Buffer<Index> row_offsets;               // (E + 1) the same offsets in backend memory (kernels)
  Buffer<int> row_expert;                  // (rows) the expert of each row
  Buffer<Index> row_pair;                  // (rows) the pair behind each expert-sorted row
  Buffer<Index> pair_row;                  // (P) row of each pair, -1 when dropped by capacity
  Buffer<Index> pair_token;                // (P) token of each pair
  Buffer<Index> row_token;                 // (rows) token of each expert-sorted row
  std::vector<Index> selected_per_expert;  // host copy: pairs routed to e before capacity
  std::vector<Index> rows_per_expert;      // host copy: pairs kept
  Index dropped = 0;
  Index rows() const { return static_cast<Index>(row_pair.size()); }
};

// What a forward reports about routing (also kept in its cache).
struct RoutingStats {
  std::vector<Index> tokens_per_expert;  // pairs computed per expert (after capacity)
  std::vector<Index> routed_per_expert;  // pairs routed per expert (before capacity)
  Index selected_pairs = 0;              // pairs chosen by the router
  Index dropped_pairs = 0;               // pairs removed by the capacity limit
  double aux_loss = 0;                   // router auxiliary loss (in the backward's loss)
  double load_balance_loss = 0;          // its parts (training forwards only):
  double z_loss = 0;                     //   aux_loss = load_balance_loss + z_loss
  double l1_loss = 0;                    //              + l1_loss
  double zero_gate_fraction = 0;         // share of (t, e) with no selection
};

}  // namespace moe
