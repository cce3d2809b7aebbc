#pragma once
// What moe::Layer checks before any work: its configuration, and the shapes
// and buffers of forward and backward calls. Each failure is a moe::Error
// naming the argument, its value and what was expected.

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "moe/core/config.hpp"
#include "moe/core/error.hpp"
#include "moe/core/tensor_buffer.hpp"
#include "moe/core/view.hpp"

namespace moe::detail {

template <class Activation>
void check_config(const LayerConfig& c) {
  require(c.d_model >= 1, "moe::Layer: d_model=", c.d_model, ", expected >= 1");
  require(c.d_ff >= 1, "moe::Layer: d_ff=", c.d_ff, ", expected >= 1");
  // A gated activation's first weight is (d, 2 d_ff): the product must not
  // overflow before the tensor's own size check sees it.
  require(!Activation::kGated || c.d_ff <= TensorLayout::kMaxElements / 2, "moe::Layer: d_ff=",
          c.d_ff, " with ", Activation::kName, " (2 d_ff columns), expected at most 2^",
          TensorLayout::kMaxBits - 1);
  require(c.experts >= 1, "moe::Layer: experts=", c.experts, ", expected >= 1");
  require(!c.expert_bias || Activation::kSupportsBias, "moe::Layer: expert_bias=true, ",
          "expected false for activation ", Activation::kName, " (it has no biases)");
  require(std::isfinite(c.dropout) && c.dropout >= 0 && c.dropout < 1,
          "moe::Layer: dropout=", c.dropout, ", expected 0 <= dropout < 1");
  require(std::isfinite(c.capacity_factor) && c.capacity_factor >= 0,
          "moe::Layer: capacity_factor=", c.capacity_factor,
          ", expected 0 (dropless) or a positive finite value");
}

// Whether the memory of two views (or spans) shares a byte.
template <class A, class B>
bool overlaps(const A& a, const B& b) {
  const auto begin_a = reinterpret_cast<std::uintptr_t>(a.data());
  const auto begin_b = reinterpret_cast<std::uintptr_t>(b.data());
  const auto bytes_a = static_cast<std::uintptr_t>(a.size()) * sizeof(*a.data());
  const auto bytes_b = static_cast<std::uintptr_t>(b.size()) * sizeof(*b.data());
  return bytes_a > 0 && bytes_b > 0 && begin_a < begin_b + bytes_b && begin_b < begin_a + bytes_a;
}

// The forward's buffers hold up to T E rows (every pair) of max(d, w d_ff)
// values: that must stay a size the layer can index and allocate.
inline void check_batch_size(const LayerConfig& config, Index tokens, Index input_width) {
  const Index limit = Index{1} << 59, E = config.experts;
  const Index row = std::max(config.d_model, input_width * config.d_ff);
  require(tokens <= limit / E / row, "moe::Layer::forward: x.rows()=", tokens, " with experts=", E,
          " and rows of ", row, " values needs buffers past 2^59 values, expected a smaller batch");
}

template <class S>
void check_forward_arguments(const LayerConfig& config, ConstMatrixView<S> x, MatrixView<S> y) {
  const Index T = x.rows(), d = config.d_model;
  require(x.cols() == d, "moe::Layer::forward: x.cols()=", x.cols(), ", expected d_model=", d);
  require(T >= 1, "moe::Layer::forward: x.rows()=", T, ", expected at least 1 token");
  require(y.rows() == T && y.cols() == d, "moe::Layer::forward: y is (", y.rows(), ", ", y.cols(),
          "), expected (", T, ", ", d, ") like x");
  require(!overlaps(x, y),
          "moe::Layer::forward: y aliases x (their memory overlaps), expected separate buffers (x "
          "is read again by backward)");
}

// A cache filled by a layer of this shape (Cache: LayerCacheData).
template <class Cache>
void check_cache_shape(const LayerConfig& config, const Cache& c) {
  const Index d = config.d_model, E = config.experts, h = config.d_ff;
  require(c.d_model == d && c.d_ff == h && c.experts == E,
          "moe::Layer::backward: cache from a layer with (d_model, d_ff, experts)=(", c.d_model,
          ", ", c.d_ff, ", ", c.experts, "), expected (", d, ", ", h, ", ", E, ")");
}

// x, dy and dx of a backward whose forward saw `tokens` tokens.
template <class S>
void check_backward_arguments(const LayerConfig& config, Index tokens, ConstMatrixView<S> x,
                              ConstMatrixView<S> dy, MatrixView<S> dx) {
  const Index T = x.rows(), d = config.d_model;
  require(x.cols() == d, "moe::Layer::backward: x.cols()=", x.cols(), ", expected d_model=", d);
  require(T == tokens, "moe::Layer::backward: x.rows()=", T, ", expected cache.tokens()=", tokens);
  require(dy.rows() == T && dy.cols() == d, "moe::Layer::backward: dy is (", dy.rows(), ", ",
          dy.cols(), "), expected (", T, ", ", d, ")");
  require(dx.rows() == T && dx.cols() == d, "moe::Layer::backward: dx is (", dx.rows(), ", ",
          dx.cols(), "), expected (", T, ", ", d, ")");
}

}  // namespace moe::detail
