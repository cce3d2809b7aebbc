#pragma once
// The adaptive-clustering router (ACMoE, Nielsen et al., "Tight Clusters Make
// Specialized Experts", ICLR 2025; docs/algorithms.md 3.3). With c_t the previous
// MoE layer's top-1 expert of token t (clusters k = 0..max_t c_t):
//   m_k = feature weights of cluster k from this layer's input X (no gradient):
//         w_kq = 1 / (MAD_kq + 1e-4), clamped at 10 mean(w), m_kq = w_kq / mean_k' w_k'q
//   z_tj = sum_q m_{c_t q} x_tq ehat_jq,   ehat_j = e_j / max(|e_j|, 1e-4)
// then top-k (2 by default) with the softmax over the selected logits. Experts
// receive the unscaled x. Without a previous assignment (the first MoE layer)
// M = 1 [choice], the plain cosine-style router; a token whose previous layer
// chose no expert (c_t = -1, e.g. after a ReLU router) also uses m = 1 [choice].
// Statistics are recomputed on every forward, eval included.
//
// Chaining: pass layer l's cache.top1_assignment() as
// ForwardContext{.previous_assignment = ...} to layer l+1's forward.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "moe/core/concepts.hpp"
#include "moe/core/error.hpp"
#include "moe/math/cluster_weights.hpp"
#include "moe/math/random.hpp"
#include "moe/router/topk_gating.hpp"

namespace moe::router {

struct AdaptiveCluster {
  int k = 2;
  bool softmax_over_selected = true;  // ACMoE's gates; false: the plain softmax over all E
  double aux_coef = 0.0;              // Switch load balancing, as TopK (off in ACMoE)
  double z_coef = 0.0;
  double init_gain = 0.32;  // orthogonal init of the expert embeddings, scaled by the gain
  Index max_clusters = 0;   // bound on c_t + 1; 0: this layer's number of experts

  static constexpr const char* kName = "adaptive_cluster";

  template <class B>
  struct Cache : TopKGating::Cache<B> {
    template <class U>
    using Buffer = typename B::template Buffer<U>;
    using S = typename B::Scalar;
    // The cluster statistics of the forward (docs/algorithms.md 3.3), for
    // reading too; K = 0 leaves them empty (M = 1).
    Index clusters = 0;          // K, 0 without a previous assignment
    Buffer<int> cluster;         // (T) c_t, -1 for none
    Buffer<Index> count;         // (K) tokens per cluster
    Buffer<double> mean;         // (K, d) mu_kq
    Buffer<double> mad;          // (K, d) s_kq, the mean absolute deviation
    Buffer<double> weights;      // (K, d) w_kq = 1 / (s_kq + 1e-4), before the clamp
    double cap = 0;              // the clamp, 10 mean(w)
    Buffer<double> clamped;      // (K, d) min(w_kq, cap)
    Buffer<double> scales;       // (K, d) m_kq; token t's M is row c_t (1 where c_t = -1)
    Buffer<S> scaled_x;          // (T, d) m_{c_t} * x_t
    Buffer<S> unit;              // (E, d) ehat_j
    Buffer<S> norm;              // (E) |e_j|
    mutable Buffer<S> d_scaled;  // (T, d) backward scratch
    mutable Buffer<S> d_unit;    // (E, d) backward scratch
  };

  Index nominal_k() const { return k; }

  TopKGating gating() const {
    return {k,
            softmax_over_selected ? math::GateNormalization::softmax_over_selected
                                  : math::GateNormalization::full_softmax,
            aux_coef, z_coef};
  }

  void validate(const LayerConfig& cfg) const {
    detail::require(k >= 1 && k <= cfg.experts, "moe::router::AdaptiveCluster: k=", k,
                    ", expected 1 <= k <= experts=", cfg.experts);
    detail::require(std::isfinite(aux_coef) && aux_coef >= 0,
                    "moe::router::AdaptiveCluster: aux_coef=", aux_coef, ", expected >= 0");
    detail::require(std::isfinite(z_coef) && z_coef >= 0,
                    "moe::router::AdaptiveCluster: z_coef=", z_coef, ", expected >= 0");
    detail::require(std::isfinite(init_gain) && init_gain > 0,
                    "moe::router::AdaptiveCluster: init_gain=", init_gain, ", expected > 0");
    detail::require(max_clusters >= 0, "moe::router::AdaptiveCluster: max_clusters=", max_clusters,
                    ", expected >= 0");
  }

  void add_parameters(TensorLayout& layout, const LayerConfig& cfg) const {
    layout.add("router.embedding", {cfg.experts, cfg.d_model});  // e_j, (E, d)
  }

  // No run state: nothing to add, save, restore or advance.
  void add_state(TensorLayout&, const LayerConfig&) const {}
  void save_state(TensorBuffer<double>&) const {}
  void restore(const TensorBuffer<double>&) {}
  void end_step(std::uint64_t) {}

  // Orthogonal init (as torch.nn.init.orthogonal_): orthonormal rows when
  // E <= d, orthonormal columns otherwise, times init_gain. Modified
  // Gram-Schmidt on normal draws, in double.
  template <class S>
  void init(TensorBuffer<S>& params, const LayerConfig& cfg, std::uint64_t seed) const {
    const Index E = cfg.experts, d = cfg.d_model;
    const bool rows = E <= d;
    const Index n = rows ? E : d, len = rows ? d : E;  // n orthonormal vectors of length len
    std::vector<double> v(static_cast<std::size_t>(n * len));
    for (std::size_t i = 0; i < v.size(); ++i) v[i] = math::standard_normal(seed, kStream, i);
    for (Index a = 0; a < n; ++a) {
      double* va = v.data() + a * len;
      for (Index b = 0; b < a; ++b) {
        const double* vb = v.data() + b * len;
        double dot = 0;
        for (Index i = 0; i < len; ++i) dot += va[i] * vb[i];
        for (Index i = 0; i < len; ++i) va[i] -= dot * vb[i];
      }
      double norm = 0;
      for (Index i = 0; i < len; ++i) norm += va[i] * va[i];
      norm = std::sqrt(norm);
      for (Index i = 0; i < len; ++i) va[i] /= norm;
    }
    auto e = params.matrix("router.embedding");
    for (Index a = 0; a < n; ++a)
      for (Index i = 0; i < len; ++i) {
        S& target = rows ? e(a, i) : e(i, a);
        target = static_cast<S>(init_gain * v[static_cast<std::size_t>(a * len + i)]);
      }
  }

  template <class B>
  void forward(const B& be, Mode mode, ConstMatrixView<typename B::Scalar> x,
               const TensorBuffer<typename B::Scalar>& params, const ForwardContext& context,
               Selection<typename B::Scalar, B::template Buffer>& sel, Cache<B>& cache) const {
    using S = typename B::Scalar;
    const Index T = x.rows(), d = x.cols(), E = sel.experts;
    cluster_scales(be, x, context, E, cache);
    cache.scaled_x.resize(static_cast<std::size_t>(T * d));
    cache.unit.resize(static_cast<std::size_t>(E * d));
    cache.norm.resize(static_cast<std::size_t>(E));

    // x~_t = m_{c_t} * x_t (m = 1 without a cluster).
    {
      const S* xs = x.data();
      const int* c = cache.cluster.data();
      const double* m = cache.scales.data();
      const bool clustered = cache.clusters > 0;
      S* out = cache.scaled_x.data();
      be.parallel_for_rows(
          T, d,
          [=] MOE_HOST_DEVICE(Index t, Index begin, Index end) {
            const int ct = clustered ? c[t] : -1;
            for (Index q = begin; q < end; ++q)
              out[t * d + q] =
                  ct >= 0 ? static_cast<S>(m[ct * d + q]) * xs[t * d + q] : xs[t * d + q];
          },
          T * d);
    }
    // ehat_j = e_j / max(|e_j|, 1e-4).
    {
      const S* e = params["router.embedding"].data();
      S* unit = cache.unit.data();
      S* norm = cache.norm.data();
      be.parallel_sum_rows(
          E, d, [=] MOE_HOST_DEVICE(Index j, Index q) { return e[j * d + q] * e[j * d + q]; },
          [=] MOE_HOST_DEVICE(Index j, S sq) { norm[j] = std::sqrt(sq); }, E * d);
      be.parallel_for_rows(
          E, d,
          [=] MOE_HOST_DEVICE(Index j, Index begin, Index end) {
            const S scale = S(1) / std::max(norm[j], static_cast<S>(kNormFloor));
            for (Index q = begin; q < end; ++q) unit[j * d + q] = e[j * d + q] * scale;
          },
          E * d);
    }
    TopKGating::resize_logits(sel, T, E);
    be.gemm_rows(true, T, E, d, S(1), cache.scaled_x.data(), d, cache.unit.data(), d, S(0),
                 sel.logits.data(), E);  // z = x~ Ehat^T
    gating().forward(be, mode, T, E, sel, cache, group_of(context));
  }

  template <class B>
  void backward(const B& be, ConstMatrixView<typename B::Scalar> x,
                const TensorBuffer<typename B::Scalar>& params,
                const Selection<typename B::Scalar, B::template Buffer>& sel, const Cache<B>& cache,
                const typename B::Scalar* dgates, typename B::Scalar* dx,
                TensorBuffer<typename B::Scalar>& grads, typename B::Scalar* dlogits) const {
    using S = typename B::Scalar;
    const Index T = x.rows(), d = x.cols(), E = sel.experts;
    TopKGating::backward(be, sel, cache, dgates, dlogits);
    cache.d_scaled.resize(static_cast<std::size_t>(T * d));
    cache.d_unit.resize(static_cast<std::size_t>(E * d));
    // dL/dx~ = dz Ehat; dx_t += m_{c_t} * dL/dx~_t (no gradient through m).
    be.gemm_rows(false, T, d, E, S(1), dlogits, E, cache.unit.data(), d, S(0),
                 cache.d_scaled.data(), d);
    {
      const S* ds = cache.d_scaled.data();
      const int* c = cache.cluster.data();
      const double* m = cache.scales.data();
      const bool clustered = cache.clusters > 0;
      be.parallel_for_rows(
          T, d,
          [=] MOE_HOST_DEVICE(Index t, Index begin, Index end) {
            const int ct = clustered ? c[t] : -1;
            for (Index q = begin; q < end; ++q)
              dx[t * d + q] +=
                  ct >= 0 ? static_cast<S>(m[ct * d + q]) * ds[t * d + q] : ds[t * d + q];
          },
          T * d);
    }
    // dL/dehat = dz^T x~; through the normalisation:
    // de_j = (I - ehat_j ehat_j^T) dL/dehat_j / |e_j|   (|e_j| > 1e-4), else dL/dehat_j / 1e-4.
    be.gemm(true, false, E, d, T, S(1), dlogits, E, cache.scaled_x.data(), d, S(0),
            cache.d_unit.data(), d);
    const S* du = cache.d_unit.data();
    const S* unit = cache.unit.data();
    const S* norm = cache.norm.data();
    S* de = grads["router.embedding"].data();
    (void)params;
    be.parallel_for(
        E,
        [=] MOE_HOST_DEVICE(Index j) {
          if (norm[j] > static_cast<S>(kNormFloor)) {
            S dot = 0;
            for (Index q = 0; q < d; ++q) dot += unit[j * d + q] * du[j * d + q];
            for (Index q = 0; q < d; ++q)
              de[j * d + q] += (du[j * d + q] - unit[j * d + q] * dot) / norm[j];
          } else {
            for (Index q = 0; q < d; ++q)
              de[j * d + q] += du[j * d + q] / static_cast<S>(kNormFloor);
          }
        },
        E * d);
  }

  // Each token's feature weights M_t = m_{c_t}, (tokens, d) row-major, from a
  // forward's cache: 1 for a token without a cluster, and everywhere without
  // a previous assignment. Computed on the host when asked.
  template <class B>
  static std::vector<double> token_scales(const Cache<B>& cache, Index tokens, Index d) {
    std::vector<double> m(static_cast<std::size_t>(tokens * d), 1.0);
    if (cache.clusters == 0) return m;
    for (Index t = 0; t < tokens; ++t) {
      const int c = cache.cluster[static_cast<std::size_t>(t)];
      if (c < 0) continue;
      for (Index q = 0; q < d; ++q)
        m[static_cast<std::size_t>(t * d + q)] = cache.scales[static_cast<std::size_t>(c * d + q)];
    }
    return m;
  }

  // The previous layer's assignment, checked before the forward touches any
  // cache: one entry per token, each -1 or a cluster in [0, max_clusters).
  void check_context(const ForwardContext& context, Index tokens, const LayerConfig& cfg) const {
    const auto& previous = context.previous_assignment;
    if (previous.empty()) return;
    detail::require(static_cast<Index>(previous.size()) == tokens,
                    "moe::router::AdaptiveCluster: previous_assignment.size()=", previous.size(),
                    ", expected x.rows()=", tokens);
    const Index bound = max_clusters > 0 ? max_clusters : cfg.experts;
    for (std::size_t t = 0; t < previous.size(); ++t)
      detail::require(previous[t] >= -1 && previous[t] < bound,
                      "moe::router::AdaptiveCluster: previous_assignment[", t, "]=", previous[t],
                      ", expected -1 (none) or a cluster in [0, max_clusters=", bound, ")");
  }

  // c_t from the context, then w, the clamp and m (docs/algorithms.md 3.3). Public
  // only because nvcc's device lambdas cannot live in private members.
  template <class B>
  void cluster_scales(const B& be, ConstMatrixView<typename B::Scalar> x,
                      const ForwardContext& context, Index E, Cache<B>& cache) const {
    const Index T = x.rows(), d = x.cols();
    const auto& previous = context.previous_assignment;
    check_context(context, T, LayerConfig{.d_model = d, .d_ff = 1, .experts = E});
    // Clusters, counts and statistics of the whole batch: a process's tokens
    // are part of it (group_of(context)); one process is the batch. Without
    // a previous assignment a process's tokens have no cluster (-1).
    const ProcessGroup& group = group_of(context);
    if (previous.empty()) {
      cache.cluster.assign(static_cast<std::size_t>(T), -1);
    } else {
      cache.cluster.assign(previous.begin(), previous.end());
    }
    const Index largest =
        previous.empty() ? -1 : *std::max_element(previous.begin(), previous.end());
    const Index K = group.max(largest) + 1;
    if (K == 0) {  // every token without a cluster: M = 1
      clear_statistics(cache);
      return;
    }
    cache.clusters = K;
    cache.count.assign(static_cast<std::size_t>(K), 0);
    for (int c : previous)
      if (c >= 0) ++cache.count[static_cast<std::size_t>(c)];
    group.sum(cache.count.data(), K);
    for (auto* buffer : {&cache.mean, &cache.mad, &cache.weights, &cache.clamped, &cache.scales})
      buffer->resize(static_cast<std::size_t>(K * d));
    const auto* xs = x.data();
    const int* c = cache.cluster.data();
    const Index* count = cache.count.data();
    double* mu = cache.mean.data();
    double* mad = cache.mad.data();
    double* w = cache.weights.data();
    // The passes over x by blocks of features (rows of parallel_for_rows),
    // each block's columns spanned as the backend cuts them.
    const Index width = feature_block(d, be.threads());
    const Index blocks = (d + width - 1) / width;
    be.parallel_for_rows(
        blocks, width,
        [=] MOE_HOST_DEVICE(Index block, Index begin, Index end) {
          const Index q0 = std::min(d, block * width + begin),
                      q1 = std::min(d, block * width + end);
          math::cluster_feature_sums(xs, c, T, d, K, q0, q1, mu);
        },
        T * d);
    group.sum(mu, K * d);
    be.parallel_for(
        d, [=] MOE_HOST_DEVICE(Index q) { math::cluster_feature_means(count, d, K, q, mu); },
        K * d);
    be.parallel_for_rows(
        blocks, width,
        [=] MOE_HOST_DEVICE(Index block, Index begin, Index end) {
          const Index q0 = std::min(d, block * width + begin),
                      q1 = std::min(d, block * width + end);
          math::cluster_feature_deviations(xs, c, T, d, K, q0, q1, mu, mad);
        },
        T * d);
    group.sum(mad, K * d);
    be.parallel_for(
        d, [=] MOE_HOST_DEVICE(Index q) { math::cluster_feature_finish(count, d, K, q, mad, w); },
        K * d);
    double mean = 0;  // pre-clamp mean over all (k, q), in a fixed order
    for (Index i = 0; i < K * d; ++i) mean += w[i];
    mean /= static_cast<double>(K * d);
    const double cap = math::kClusterClampFactor * mean;
    cache.cap = cap;
    double* clamped = cache.clamped.data();
    double* m = cache.scales.data();
    be.parallel_for(
        d,
        [=] MOE_HOST_DEVICE(Index q) { math::cluster_feature_scales(w, d, K, q, cap, clamped, m); },
        K * d);
  }

 private:
  // No clusters (M = 1): no statistics, rather than the last forward's.
  template <class B>
  static void clear_statistics(Cache<B>& cache) {
    cache.clusters = 0;
    cache.cap = 0;
    cache.count.resize(0);
    for (auto* buffer : {&cache.mean, &cache.mad, &cache.weights, &cache.clamped, &cache.scales})
      buffer->resize(0);
  }

  static constexpr double kNormFloor = 1e-4;
  // Features per block of the statistics' passes over x: at most 128 (512
  // bytes of a float row, read contiguously), down to 16 so that there are
  // about two blocks per thread. Each sum runs over the tokens in order
  // whatever the width, so the width never changes a result.
  static Index feature_block(Index d, int threads) {
    const Index parts = 2 * Index{std::max(threads, 1)};
    const Index per_thread = (d + parts - 1) / parts;
    return std::clamp<Index>((per_thread + 15) / 16 * 16, 16, 128);
  }
  static constexpr std::uint64_t kStream = 0x61636d6f65ull;  // "acmoe"
};

static_assert(RouterPolicy<AdaptiveCluster, archetype::Backend>);

}  // namespace moe::router
