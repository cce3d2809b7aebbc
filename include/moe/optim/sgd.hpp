#pragma once
// Plain SGD with optional momentum over a whole TensorBuffer: the small
// optimizer of the examples and tests (any optimizer can use flat()). Its
// options are checked at construction and at every step, and its velocity
// belongs to the one parameter buffer it first stepped (reset() forgets it).
// A non-finite gradient is refused before anything changes.

#include <cmath>
#include <vector>

#include "moe/core/error.hpp"
#include "moe/core/tensor_buffer.hpp"

namespace moe::optim {

struct SgdOptions {
  double lr = 1e-2;
  double momentum = 0.0;
};

class Sgd {
 public:
  explicit Sgd(SgdOptions options = {}) : options_(options) { validate(options_); }

  // e.g. a learning-rate schedule sets lr; checked again at the next step.
  SgdOptions& options() { return options_; }

  template <class T>
  void step(TensorBuffer<T>& params, const TensorBuffer<T>& grads) {
    validate(options_);
    detail::require(params.same_layout(grads),
                    "moe::optim::Sgd::step: grads has another layout than params (size ",
                    grads.size(), " vs ", params.size(), ")");
    auto p = params.flat();
    auto g = grads.flat();
    check_binding(p.data(), p.size());
    check_gradients(grads);
    if (bound_ == nullptr) {
      velocity_.assign(p.size(), 0.0);
      bound_ = p.data();
    }
    const auto [lr, momentum] = options_;
    for (const auto& spec : params.layout().specs()) {
      if (!spec.trainable) continue;  // frozen tensors never move
      const auto begin = static_cast<std::size_t>(spec.offset);
      const auto end = begin + static_cast<std::size_t>(spec.size());
      for (std::size_t i = begin; i < end; ++i) {
        velocity_[i] = momentum * velocity_[i] + static_cast<double>(g[i]);
        p[i] = static_cast<T>(static_cast<double>(p[i]) - lr * velocity_[i]);
      }
    }
  }

  // Forgets the velocity and its buffer: the next step starts afresh, on any
  // buffer. The options stay.
  void reset() {
    velocity_.clear();
    bound_ = nullptr;
  }

 private:
  // The velocity belongs to the first buffer stepped since construction or
  // reset(). Its address tells it from a copy of the same size.
  void check_binding(const void* data, std::size_t size) const {
    if (bound_ == nullptr) return;  // nothing to bind yet: any buffer
    detail::require(velocity_.size() == size, "moe::optim::Sgd::step: params of size ", size,
                    ", expected the buffer this optimizer has a velocity for (size ",
                    velocity_.size(), "): one Sgd per parameter buffer");
    detail::require(bound_ == data,
                    "moe::optim::Sgd::step: params is another buffer of the same size (", size,
                    "), expected the one this optimizer first stepped: its velocity belongs to "
                    "that buffer (one Sgd per parameter buffer; reset() forgets it)");
  }

  // A NaN or Inf would stay in the velocity (with momentum) and reach every
  // weight it touches. Frozen tensors' gradients are never read.
  template <class T>
  static void check_gradients(const TensorBuffer<T>& grads) {
    for (const auto& spec : grads.layout().specs()) {
      if (!spec.trainable) continue;
      const auto g = grads.flat().subspan(static_cast<std::size_t>(spec.offset),
                                          static_cast<std::size_t>(spec.size()));
      for (std::size_t i = 0; i < g.size(); ++i)
        detail::require(std::isfinite(static_cast<double>(g[i])), "moe::optim::Sgd::step: grads '",
                        spec.name, "'[", i, "]=", g[i], ", expected finite values");
    }
  }

  static void validate(const SgdOptions& o) {
    detail::require(o.lr >= 0 && std::isfinite(o.lr), "moe::optim::Sgd: lr=", o.lr,
                    ", expected a finite value >= 0");
    detail::require(o.momentum >= 0 && o.momentum < 1, "moe::optim::Sgd: momentum=", o.momentum,
                    ", expected 0 <= momentum < 1");
  }

  SgdOptions options_;
  std::vector<double> velocity_;
  const void* bound_ = nullptr;  // the parameter buffer of velocity_
};

}  // namespace moe::optim
