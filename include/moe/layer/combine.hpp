#pragma once
// Between tokens and rows on the tokens' side of a dispatch: the gather of
// each pair's input row, the combine
//   y_t = sum_{i in A_t} G_ti E_i(x_t)          (docs/algorithms.md section 2)
// and its backward: dE_i(x_t) = G_ti dy_t, dL/dG_ti = <dy_t, E_i(x_t)>, and
// dx_t = sum of its pairs' input gradients. Every sum over a token's pairs
// runs in the pairs' fixed order, without atomics, so results are bitwise
// reproducible.

#include "moe/core/concepts/backend.hpp"
#include "moe/core/routing.hpp"

namespace moe {

// A batch's pairs as the combine sees them (pointers into backend memory):
// the computed pairs of token t are [offsets[t], offsets[t + 1]), and the
// router's selected ones lead them (selected[t + 1] - selected[t] of them).
template <class S>
struct TokenPairs {
  Index tokens = 0, experts = 0;
  const Index* offsets = nullptr;   // (T + 1) computed pairs, CSR over tokens
  const Index* selected = nullptr;  // (T + 1) the router's selection, CSR over tokens
  const int* expert = nullptr;      // (P) expert of each computed pair
  const Index* row = nullptr;       // (P) its row on the tokens' side, -1 if dropped
  const Index* token = nullptr;     // (P) its token
  const S* gates = nullptr;         // (T, E) the router's gates G
};

template <class S, template <class> class Buffer>
TokenPairs<S> token_pairs(const Selection<S, Buffer>& selection,
                          const Selection<S, Buffer>& computed, const Dispatch<Buffer>& tokens) {
  return {selection.tokens,
          selection.experts,
          computed.token_offsets.data(),
          selection.token_offsets.data(),
          computed.pair_expert.data(),
          tokens.pair_row.data(),
          tokens.pair_token.data(),
          selection.gates.data()};
}

namespace detail {

// out_t = sum over t's pairs p with a row (r_p >= 0) of w_p rows[r_p], in
// pair order: w_p = G_{t, e_p} over the selected pairs when `gated`, else 1
// over every computed pair.
template <class B, class S>
void sum_pair_rows(const B& be, const TokenPairs<S>& pairs, bool gated, const S* rows, Index d,
                   Index row_count, S* out) {
  const TokenPairs<S> p = pairs;
  be.parallel_for_rows(
      p.tokens, d,
      [=] MOE_HOST_DEVICE(Index t, Index begin, Index end) {
        S* ot = out + t * d;
        for (Index j = begin; j < end; ++j) ot[j] = S(0);
        const Index first = p.offsets[t];
        const Index last = gated ? first + p.selected[t + 1] - p.selected[t] : p.offsets[t + 1];
        for (Index q = first; q < last; ++q) {
          const Index r = p.row[q];
          if (r < 0) continue;  // dropped by capacity
          const S w = gated ? p.gates[t * p.experts + p.expert[q]] : S(1);
          const S* src = rows + r * d;
          for (Index j = begin; j < end; ++j) ot[j] += w * src[j];
        }
      },
      (row_count + p.tokens) * d);
}

}  // namespace detail

// x_rows (rows, d): each row the input of its pair's token.
template <class B, class S>
void gather_rows(const B& be, const Dispatch<B::template Buffer>& tokens, const S* x, Index d,
                 S* x_rows) {
  const Index* row_pair = tokens.row_pair.data();
  const Index* pair_token = tokens.pair_token.data();
  be.parallel_for_rows(
      tokens.rows(), d,
      [=] MOE_HOST_DEVICE(Index r, Index begin, Index end) {
        const S* src = x + pair_token[row_pair[r]] * d;
        S* dst = x_rows + r * d;
        for (Index j = begin; j < end; ++j) dst[j] = src[j];
      },
      tokens.rows() * d);
}

// y_t = sum over t's selected pairs of G_ti out_rows[row] (out_rows: E_i(x_t)).
template <class B, class S>
void combine(const B& be, const TokenPairs<S>& pairs, const S* out_rows, Index d, Index row_count,
             S* y) {
  detail::sum_pair_rows(be, pairs, /*gated=*/true, out_rows, d, row_count, y);
}

// The combine's backward: d_out (rows, d) = G_ti dy_t for the selected pairs'
// rows (0 for the other computed pairs'), and d_gates (T, E) = <dy_t,
// E_i(x_t)> for every computed pair that has a row, 0 elsewhere.
template <class B, class S>
void combine_backward(const B& be, const Dispatch<B::template Buffer>& tokens,
                      const TokenPairs<S>& pairs, const S* out_rows, const S* dy, Index d, S* d_out,
                      S* d_gates) {
  const TokenPairs<S> p = pairs;
  const Index rows = tokens.rows(), T = p.tokens, E = p.experts;
  const Index* row_pair = tokens.row_pair.data();
  be.parallel_for_rows(
      rows, d,
      [=] MOE_HOST_DEVICE(Index r, Index begin, Index end) {
        const Index q = row_pair[r], t = p.token[q];
        const bool is_selected = q < p.offsets[t] + p.selected[t + 1] - p.selected[t];
        const S gate = is_selected ? p.gates[t * E + p.expert[q]] : S(0);
        const S* g = dy + t * d;
        S* dor = d_out + r * d;
        for (Index j = begin; j < end; ++j) dor[j] = gate * g[j];
      },
      rows * d);
  be.parallel_for(
      T * E, [=] MOE_HOST_DEVICE(Index i) { d_gates[i] = S(0); }, T * E);
  // Over the rows, each the row of one computed pair (a pair dropped by
  // capacity has none, and keeps its 0): no branch in the sum's terms.
  be.parallel_sum_rows(
      rows, d,
      [=] MOE_HOST_DEVICE(Index r, Index j) {
        return dy[p.token[row_pair[r]] * d + j] * out_rows[r * d + j];
      },
      [=] MOE_HOST_DEVICE(Index r, S dot) {
        const Index q = row_pair[r];
        d_gates[p.token[q] * E + p.expert[q]] = dot;
      },
      rows * d);
}

// dx_t = sum over t's computed pairs of d_x_rows[row] (the input gradient of
// each pair; an unselected pair's is 0).
template <class B, class S>
void sum_input_gradients(const B& be, const TokenPairs<S>& pairs, const S* d_x_rows, Index d,
                         Index row_count, S* dx) {
  detail::sum_pair_rows(be, pairs, /*gated=*/false, d_x_rows, d, row_count, dx);
}

}  // namespace moe
