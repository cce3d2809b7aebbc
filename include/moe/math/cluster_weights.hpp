#pragma once
// Per-feature math of ACMoE's cluster weights (docs/algorithms.md 3.3), shared by
// backends. For one feature q, over the tokens of each cluster k:
//   mu_kq = mean x_tq,  s_kq = mean |x_tq - mu_kq|,  w_kq = 1 / (s_kq + 1e-4);
// an empty cluster has mu = s = 0.

#include <cmath>

#include "moe/core/config.hpp"

namespace moe::math {

inline constexpr double kClusterSpreadEpsilon = 1e-4;  // ACMoE's 1e-4 in w = 1/(s + eps)
inline constexpr double kClusterClampFactor = 10.0;    // w clamped at 10 * mean(w)

// Three passes per feature q over x (T, d) and cluster (T) in [-1, K), so
// that a batch spread over processes can sum each pass's per-cluster parts
// (the sums, then the deviations) over them in between:
//   cluster_feature_sums:       mean[k * d + q] = sum over cluster k of x_tq
//   (then mean /= count[k], the tokens of cluster k, where count > 0)
//   cluster_feature_deviations: mad[k * d + q] = sum over cluster k of |x_tq - mu_kq|
//   cluster_feature_finish:     mad /= count[k]; w[k * d + q] = 1 / (mad + 1e-4)
// The two passes over x take a span of features [q0, q1): each sum runs over
// t in order whatever the span, and a wide span reads x's rows contiguously.
template <class S>
MOE_HOST_DEVICE void cluster_feature_sums(const S* x, const int* cluster, Index T, Index d, Index K,
                                          Index q0, Index q1, double* mean) {
  for (Index k = 0; k < K; ++k)
    for (Index q = q0; q < q1; ++q) mean[k * d + q] = 0;
  for (Index t = 0; t < T; ++t) {
    if (cluster[t] < 0) continue;
    double* sum = mean + cluster[t] * d;
    for (Index q = q0; q < q1; ++q) sum[q] += static_cast<double>(x[t * d + q]);
  }
}

MOE_HOST_DEVICE inline void cluster_feature_means(const Index* count, Index d, Index K, Index q,
                                                  double* mean) {
  for (Index k = 0; k < K; ++k)
    if (count[k] > 0) mean[k * d + q] /= static_cast<double>(count[k]);
}

template <class S>
MOE_HOST_DEVICE void cluster_feature_deviations(const S* x, const int* cluster, Index T, Index d,
                                                Index K, Index q0, Index q1, const double* mean,
                                                double* mad) {
  for (Index k = 0; k < K; ++k)
    for (Index q = q0; q < q1; ++q) mad[k * d + q] = 0;
  for (Index t = 0; t < T; ++t) {
    if (cluster[t] < 0) continue;
    const double* mu = mean + cluster[t] * d;
    double* sum = mad + cluster[t] * d;
    for (Index q = q0; q < q1; ++q) sum[q] += std::fabs(static_cast<double>(x[t * d + q]) - mu[q]);
  }
}

MOE_HOST_DEVICE inline void cluster_feature_finish(const Index* count, Index d, Index K, Index q,
                                                   double* mad, double* w) {
  for (Index k = 0; k < K; ++k) {
    if (count[k] > 0) mad[k * d + q] /= static_cast<double>(count[k]);
    w[k * d + q] = 1.0 / (mad[k * d + q] + kClusterSpreadEpsilon);
  }
}

// Clamp at `cap` (10 x the pre-clamp mean of all w) and divide by the column
// mean over clusters: m_kq = w_kq / mean_k' w_k'q. Writes clamped[k * d + q]
// = min(w_kq, cap) and m[k * d + q].
MOE_HOST_DEVICE inline void cluster_feature_scales(const double* w, Index d, Index K, Index q,
                                                   double cap, double* clamped, double* m) {
  double column = 0;
  for (Index k = 0; k < K; ++k) {
    clamped[k * d + q] = w[k * d + q] < cap ? w[k * d + q] : cap;
    column += clamped[k * d + q];
  }
  column /= static_cast<double>(K);
  for (Index k = 0; k < K; ++k) m[k * d + q] = clamped[k * d + q] / column;
}

}  // namespace moe::math
