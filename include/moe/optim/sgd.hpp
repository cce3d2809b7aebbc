#pragma once
// Plain SGD with optional momentum over a whole TensorBuffer: the small
// optimizer of the examples and tests (any optimizer can use flat()).

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
  explicit Sgd(SgdOptions options = {}) : options_(options) {
    detail::require(options.lr >= 0 && std::isfinite(options.lr),
                    "moe::optim::Sgd: lr=", options.lr, ", expected a finite value >= 0");
    detail::require(options.momentum >= 0 && options.momentum < 1,
                    "moe::optim::Sgd: momentum=", options.momentum, ", expected 0 <= momentum < 1");
  }

  SgdOptions& options() { return options_; }

  template <class T>
  void step(TensorBuffer<T>& params, const TensorBuffer<T>& grads) {
    detail::require(params.same_layout(grads),
                    "moe::optim::Sgd::step: grads has another layout than params (size ",
                    grads.size(), " vs ", params.size(), ")");
    auto p = params.flat();
    auto g = grads.flat();
    const auto [lr, momentum] = options_;
    velocity_.resize(p.size(), 0.0);
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
  SgdOptions options_;
  std::vector<double> velocity_;
};

}  // namespace moe::optim
