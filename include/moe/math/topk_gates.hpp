#pragma once
// Per-token math of the TopK router (docs/algorithms.md 3.1), shared by backends.

#include <cmath>

#include "moe/math/softmax.hpp"

namespace moe::math {

// How the gates G follow from p = softmax(z). Off the selection A, G is the
// dense gate Default MoE uses for an unselected expert (G~ = p, or none).
enum class GateNormalization : int {
  full_softmax = 0,          // G_i = p_i (Switch, Default MoE); p is dense over all E
  renormalize = 1,           // G_i = p_i / sum_{j in A} p_j (Mixtral) on A, p_i off A
  softmax_over_selected = 2  // G = softmax(z_A) (SMoE-Dropout, ACMoE), 0 off A
};

MOE_HOST_DEVICE inline bool contains(const int* chosen, int k, int j) {
  for (int i = 0; i < k; ++i)
    if (chosen[i] == j) return true;
  return false;
}

// One token's forward: p = softmax(z), A = top-k of z (ties: lower index),
// gates g over all E. Returns logsumexp(z).
template <class S>
MOE_HOST_DEVICE S topk_gates_forward(const S* z, int E, int k, GateNormalization norm, S* p,
                                     int* chosen, S* g) {
  const S lse = softmax(z, E, p);
  top_k(z, E, k, chosen);
  if (norm == GateNormalization::full_softmax) {
    for (int j = 0; j < E; ++j) g[j] = p[j];
    return lse;
  }
  if (norm == GateNormalization::renormalize) {
    for (int j = 0; j < E; ++j) g[j] = p[j];  // G~ = p off A
    S sum = 0;
    for (int i = 0; i < k; ++i) sum += p[chosen[i]];
    for (int i = 0; i < k; ++i) g[chosen[i]] = p[chosen[i]] / sum;
  } else {
    for (int j = 0; j < E; ++j) g[j] = S(0);
    const S m = z[chosen[0]];  // the largest selected logit
    S sum = 0;
    for (int i = 0; i < k; ++i) sum += std::exp(z[chosen[i]] - m);
    for (int i = 0; i < k; ++i) g[chosen[i]] = std::exp(z[chosen[i]] - m) / sum;
  }
  return lse;
}

// One token's backward: dz = dL/dz from dL/dg (every entry), the Switch
// load-balancing gradient dAux/dp_e = aux_grad[e] (through the full softmax)
// and the z-loss gradient coefficient zc = d(z_coef * lse^2 / T)/d lse.
template <class S>
MOE_HOST_DEVICE void topk_gates_backward(const S* p, const S* g, const int* chosen, int E, int k,
                                         GateNormalization norm, const S* dg, const S* aux_grad,
                                         S zc, S* dz) {
  // Everything that reaches p: the gates (full softmax; renormalised ones on
  // A through s = sum_A p, off A as G~ = p) and the aux loss.
  S dot = 0;
  for (int j = 0; j < E; ++j) {
    S dp = aux_grad[j];
    if (norm == GateNormalization::full_softmax) {
      dp += dg[j];
    } else if (norm == GateNormalization::renormalize && contains(chosen, k, j)) {
      // G_j = p_j / s:  dL/dp_j = (dg_j - sum_{i in A} g_i dg_i) / s, j in A.
      S gdg = 0, s = 0;
      for (int i = 0; i < k; ++i) {
        gdg += g[chosen[i]] * dg[chosen[i]];
        s += p[chosen[i]];
      }
      dp += (dg[j] - gdg) / s;
    } else if (norm == GateNormalization::renormalize) {
      dp += dg[j];  // G~_j = p_j
    }
    dz[j] = dp;
    dot += p[j] * dp;
  }
  for (int j = 0; j < E; ++j) dz[j] = p[j] * (dz[j] - dot) + zc * p[j];
  if (norm == GateNormalization::softmax_over_selected) {
    S gdg = 0;
    for (int i = 0; i < k; ++i) gdg += g[chosen[i]] * dg[chosen[i]];
    for (int i = 0; i < k; ++i) dz[chosen[i]] += g[chosen[i]] * (dg[chosen[i]] - gdg);
  }
}

}  // namespace moe::math
