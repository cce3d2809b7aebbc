#pragma once
// Plain SGD with optional momentum over a whole TensorBuffer: the small
// optimizer of the examples and tests (any optimizer can use flat()). Its
// options are checked at construction and at every step, and its velocity
// belongs to the one parameter buffer it first stepped.

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
    if (bound_ == nullptr) {
      velocity_.assign(p.size(), 0.0);
      bound_ = p.data();
    }
    detail::require(velocity_.size() == p.size() && bound_ == p.data(),
                    "moe::optim::Sgd::step: params of size ", p.size(),
                    ", expected the buffer this optimizer has a velocity for (size ",
                    velocity_.size(), "): one Sgd per parameter buffer");
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

 private:
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
