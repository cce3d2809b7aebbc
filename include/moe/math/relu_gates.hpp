#pragma once
// Per-token math of the ReLU router (ReMoE, docs/algorithms.md 3.2), shared by
// backends: G = relu(z), A = {i : z_i > 0}, no top-k, no softmax.

#include "moe/math/softmax.hpp"

namespace moe::math {

// Writes g = relu(z) and returns |A|, the number of positive logits.
template <class S>
MOE_HOST_DEVICE int relu_gates_forward(const S* z, int E, S* g) {
  int active = 0;
  for (int j = 0; j < E; ++j) {
    g[j] = z[j] > S(0) ? z[j] : S(0);
    active += z[j] > S(0) ? 1 : 0;
  }
  return active;
}

// The active experts, largest logit first (so the first is the top-1); the
// `active` best logits are exactly the positive ones.
template <class S>
MOE_HOST_DEVICE void relu_selected(const S* z, int E, int active, int* chosen) {
  if (active > 0) top_k(z, E, active, chosen);
}

// dz_j = (dg_j + l1_grad_j) 1[z_j > 0]: the gates' gradient plus the L1 term's.
template <class S>
MOE_HOST_DEVICE void relu_gates_backward(const S* z, const S* dg, const S* l1_grad, int E, S* dz) {
  for (int j = 0; j < E; ++j) dz[j] = z[j] > S(0) ? dg[j] + l1_grad[j] : S(0);
}

}  // namespace moe::math
