#pragma once
// Per-token router math shared by every backend: pure functions on one row,
// no allocation, no exceptions.

#include <cmath>

#include "moe/core/config.hpp"

namespace moe::math {

// log(sum_j exp(z_j)), stabilised by the maximum.
template <class S>
MOE_HOST_DEVICE S logsumexp(const S* z, int n) {
  S m = z[0];
  for (int j = 1; j < n; ++j) m = z[j] > m ? z[j] : m;
  S sum = 0;
  for (int j = 0; j < n; ++j) sum += std::exp(z[j] - m);
  return m + std::log(sum);
}

// p = softmax(z) over n entries; returns logsumexp(z) (the z-loss needs it).
template <class S>
MOE_HOST_DEVICE S softmax(const S* z, int n, S* p) {
  S m = z[0];
  for (int j = 1; j < n; ++j) m = z[j] > m ? z[j] : m;
  S sum = 0;
  for (int j = 0; j < n; ++j) {
    p[j] = std::exp(z[j] - m);
    sum += p[j];
  }
  const S inv = S(1) / sum;
  for (int j = 0; j < n; ++j) p[j] *= inv;
  return m + std::log(sum);
}

// The softmax Jacobian-vector product, accumulated:
// dz_j += p_j (dp_j - sum_i p_i dp_i).
template <class S>
MOE_HOST_DEVICE void softmax_backward_add(const S* p, const S* dp, int n, S* dz) {
  S dot = 0;
  for (int j = 0; j < n; ++j) dot += p[j] * dp[j];
  for (int j = 0; j < n; ++j) dz[j] += p[j] * (dp[j] - dot);
}

// `a` ranks before `b`: larger score first, lower index first among ties, NaN
// after every number (so a NaN logit cannot take a real expert's place).
template <class S>
MOE_HOST_DEVICE bool ranks_before(S score_a, int a, S score_b, int b) {
  const bool a_nan = score_a != score_a, b_nan = score_b != score_b;
  if (a_nan || b_nan) return a_nan ? (b_nan && a < b) : true;
  return score_a > score_b || (score_a == score_b && a < b);
}

// The k best of n scores, best first (ties: lower index first), by insertion
// into a sorted list of length k: O(n k), fine for router widths.
// NaN scores never rank before a number, so they are chosen last.
template <class S>
MOE_HOST_DEVICE void top_k(const S* score, int n, int k, int* chosen) {
  int filled = 0;
  for (int j = 0; j < n; ++j) {
    if (filled == k && !ranks_before(score[j], j, score[chosen[k - 1]], chosen[k - 1])) continue;
    int pos = filled < k ? filled++ : k - 1;
    while (pos > 0 && ranks_before(score[j], j, score[chosen[pos - 1]], chosen[pos - 1])) {
      chosen[pos] = chosen[pos - 1];
      --pos;
    }
    chosen[pos] = j;
  }
}

}  // namespace moe::math
