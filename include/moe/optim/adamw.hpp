#pragma once
// AdamW (Loshchilov & Hutter 2019): Adam with decoupled weight decay,
//   m = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) g^2,
//   p -= lr * (m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps) + wd * p).
// The small optimizer of the examples and tests; state in double. Its
// options are checked at construction and at every step (options() may
// change them between steps), and its moments belong to the one parameter
// buffer it first stepped (reset() forgets them). A step that would leave
// state restore() refuses (a non-finite gradient, a count of 2^53) is
// refused before anything changes.

#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "moe/core/error.hpp"
#include "moe/core/tensor_buffer.hpp"

namespace moe::optim {

struct AdamWOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
};

class AdamW {
 public:
  explicit AdamW(AdamWOptions options = {}) : options_(options) { validate(options_); }

  // e.g. a learning-rate schedule sets lr; checked again at the next step.
  AdamWOptions& options() { return options_; }

  // The largest step count: beta^steps is computed in double, exact below 2^53.
  static constexpr std::uint64_t kMaxSteps = (std::uint64_t{1} << 53) - 1;

  template <class T>
  void step(TensorBuffer<T>& params, const TensorBuffer<T>& grads) {
    validate(options_);
    detail::require(params.same_layout(grads),
                    "moe::optim::AdamW::step: grads has another layout than params (size ",
                    grads.size(), " vs ", params.size(), ")");
    auto p = params.flat();
    auto g = grads.flat();
    check_binding(p.data(), p.size());
    detail::require(steps_ < kMaxSteps, "moe::optim::AdamW::step: steps()=", steps_,
                    ", expected < 2^53 - 1 (restore() takes counts below 2^53)");
    check_gradients(grads);
    if (m_.empty()) {
      m_.assign(p.size(), 0.0);
      v_.assign(p.size(), 0.0);
    }
    bound_ = p.data();  // the first step, or the first after restore() or reset()
    ++steps_;
    const auto [lr, beta1, beta2, eps, weight_decay] = options_;
    const double c1 = 1.0 - std::pow(beta1, static_cast<double>(steps_));
    const double c2 = 1.0 - std::pow(beta2, static_cast<double>(steps_));
    for (const auto& spec : params.layout().specs()) {
      if (!spec.trainable) continue;  // frozen: neither a step nor weight decay
      const auto begin = static_cast<std::size_t>(spec.offset);
      const auto end = begin + static_cast<std::size_t>(spec.size());
      for (std::size_t i = begin; i < end; ++i) {
        const double gi = static_cast<double>(g[i]);
        m_[i] = beta1 * m_[i] + (1 - beta1) * gi;
        v_[i] = beta2 * v_[i] + (1 - beta2) * gi * gi;
        const double update = (m_[i] / c1) / (std::sqrt(v_[i] / c2) + eps);
        p[i] = static_cast<T>(static_cast<double>(p[i]) -
                              lr * (update + weight_decay * static_cast<double>(p[i])));
      }
    }
  }

  std::uint64_t steps() const { return steps_; }

  // The moments (empty before the first step), for checkpoints.
  std::span<const double> first_moment() const { return m_; }
  std::span<const double> second_moment() const { return v_; }

  // Restores a checkpoint's state: the step count (below 2^53) and both
  // moments (finite; v >= 0). The next step binds them to the buffer it steps.
  void restore(std::uint64_t steps, std::span<const double> m, std::span<const double> v) {
    detail::require(steps <= kMaxSteps, "moe::optim::AdamW::restore: steps=", steps,
                    ", expected < 2^53 (beta^steps needs it exact in a double)");
    detail::require(m.size() == v.size(), "moe::optim::AdamW::restore: m.size()=", m.size(),
                    ", expected v.size()=", v.size());
    for (std::size_t i = 0; i < m.size(); ++i) {
      detail::require(std::isfinite(m[i]), "moe::optim::AdamW::restore: m[", i, "]=", m[i],
                      ", expected finite values");
      detail::require(v[i] >= 0 && std::isfinite(v[i]), "moe::optim::AdamW::restore: v[", i,
                      "]=", v[i], ", expected finite values >= 0");
    }
    steps_ = steps;
    m_.assign(m.begin(), m.end());
    v_.assign(v.begin(), v.end());
    bound_ = nullptr;
  }

  // Forgets the step count, the moments and their buffer: the next step
  // starts afresh, on any buffer. The options stay.
  void reset() {
    m_.clear();
    v_.clear();
    bound_ = nullptr;
    steps_ = 0;
  }

 private:
  // The moments belong to one buffer: the first stepped since construction,
  // restore() or reset(). Its address tells it from a copy of the same size.
  void check_binding(const void* data, std::size_t size) const {
    if (bound_ == nullptr && m_.empty()) return;  // nothing to bind yet: any buffer
    detail::require(m_.size() == size, "moe::optim::AdamW::step: params of size ", size,
                    ", expected the buffer this optimizer has moments for (size ", m_.size(),
                    "): one AdamW per parameter buffer");
    detail::require(bound_ == nullptr || bound_ == data,
                    "moe::optim::AdamW::step: params is another buffer of the same size (", size,
                    "), expected the one this optimizer first stepped: its moments belong to "
                    "that buffer (one AdamW per parameter buffer; reset() forgets them)");
  }

  // One NaN or Inf, or a gradient whose square overflows, would stay in the
  // moments for good (and restore() refuses them). Frozen tensors' gradients
  // are never read.
  template <class T>
  static void check_gradients(const TensorBuffer<T>& grads) {
    constexpr const char* where = "moe::optim::AdamW::step";
    for (const auto& spec : grads.layout().specs()) {
      if (!spec.trainable) continue;
      const auto g = grads.flat().subspan(static_cast<std::size_t>(spec.offset),
                                          static_cast<std::size_t>(spec.size()));
      for (std::size_t i = 0; i < g.size(); ++i) {
        const auto gi = static_cast<double>(g[i]);
        detail::require(std::isfinite(gi * gi), where, ": grads '", spec.name, "'[", i, "]=", g[i],
                        ", expected finite values (and squares: |g| < 1.3e154)");
      }
    }
  }

  static void validate(const AdamWOptions& o) {
    detail::require(o.lr >= 0 && std::isfinite(o.lr), "moe::optim::AdamW: lr=", o.lr,
                    ", expected a finite value >= 0");
    detail::require(o.beta1 >= 0 && o.beta1 < 1, "moe::optim::AdamW: beta1=", o.beta1,
                    ", expected 0 <= beta1 < 1");
    detail::require(o.beta2 >= 0 && o.beta2 < 1, "moe::optim::AdamW: beta2=", o.beta2,
                    ", expected 0 <= beta2 < 1");
    detail::require(o.eps > 0 && std::isfinite(o.eps), "moe::optim::AdamW: eps=", o.eps,
                    ", expected a finite value > 0");
    detail::require(o.weight_decay >= 0 && std::isfinite(o.weight_decay),
                    "moe::optim::AdamW: weight_decay=", o.weight_decay,
                    ", expected a finite value >= 0");
  }

  AdamWOptions options_;
  std::vector<double> m_, v_;
  const void* bound_ = nullptr;  // the parameter buffer of m_ and v_ (null: the next one)
  std::uint64_t steps_ = 0;
};

}  // namespace moe::optim
