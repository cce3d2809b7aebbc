#pragma once
// What moe::Layer checks before any work: its configuration, and the shapes
// and buffers of forward and backward calls. Each failure is a moe::Error
// naming the argument, its value and what was expected.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <new>
#include <span>
#include <string_view>

#include "moe/core/config.hpp"
#include "moe/core/error.hpp"
#include "moe/core/process_group.hpp"
#include "moe/core/tensor_buffer.hpp"
#include "moe/core/view.hpp"

namespace moe::detail {

template <class Activation>
void check_config(const LayerConfig& c) {
  require(c.d_model >= 1, "moe::Layer: d_model=", c.d_model, ", expected >= 1");
  require(c.d_ff >= 1, "moe::Layer: d_ff=", c.d_ff, ", expected >= 1");
  // A gated activation's first weight is (d, 2 d_ff): the product must not
  // overflow before the tensor's own size check sees it.
  require(!Activation::kGated || c.d_ff <= TensorLayout::kMaxElements / 2,
          "moe::Layer: d_ff=", c.d_ff, " with ", Activation::kName,
          " (2 d_ff columns), expected at most 2^", TensorLayout::kMaxBits - 1);
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

// What the forward writes (y) must not overlap the layer's parameters or
// state (x against y: check_forward_arguments).
template <class S>
void check_forward_buffers(MatrixView<S> y, std::span<const S> params,
                           std::span<const double> state) {
  require(!overlaps(y, params),
          "moe::Layer::forward: y overlaps the layer's parameters, expected a buffer of its own");
  require(!overlaps(y, state),
          "moe::Layer::forward: y overlaps the layer's state (layer.state()), expected a buffer "
          "of its own");
}

// A cache is only this layer's, from a forward that saw its current weights.
template <class Cache>
void check_cache_owner(const Cache& c, std::uint64_t layer, std::uint64_t parameters_version) {
  require(c.owner == layer, "moe::Layer::backward: cache filled by layer #", c.owner,
          ", expected this layer #", layer,
          " (a copy of a layer is a new layer with its own caches)");
  require(c.parameters_version == parameters_version,
          "moe::Layer::backward: the parameters were taken for writing (layer.parameters()) or "
          "replaced (the layer assigned to) since this cache's forward, expected the weights of "
          "the forward: run the forward again (read them through "
          "std::as_const(layer).parameters() in between)");
}

// What the backward writes (dx, grads) must not overlap what it reads after
// writing (x, the parameters), each other, or the layer's state.
template <class S>
void check_backward_buffers(ConstMatrixView<S> x, MatrixView<S> dx, std::span<const S> grads,
                            std::span<const S> params, std::span<const double> state) {
  require(!overlaps(dx, x),
          "moe::Layer::backward: dx aliases x (their memory overlaps), expected separate buffers "
          "(x is read after dx is written)");
  require(!overlaps(dx, params) && !overlaps(dx, grads),
          "moe::Layer::backward: dx overlaps the parameters or grads, expected a buffer of its "
          "own");
  require(!overlaps(grads, params),
          "moe::Layer::backward: grads overlaps the layer's parameters, expected "
          "layer.make_gradients() (gradients would be added into the weights)");
  require(!overlaps(x, grads), "moe::Layer::backward: x overlaps grads, expected separate buffers");
  require(!overlaps(dx, state) && !overlaps(grads, state),
          "moe::Layer::backward: dx or grads overlaps the layer's state (layer.state()), "
          "expected buffers of their own");
}

// With check_finite on, the first non-finite value of m is an Error naming
// its place and value (m may be device memory).
template <class Backend, class S>
void check_finite(const Backend& backend, const LayerConfig& config, const char* where,
                  const char* name, ConstMatrixView<S> m) {
  if (!config.check_finite) return;
  const Index bad = backend.first_non_finite(m.data(), m.size());
  if (bad < 0) return;
  S value;
  backend.copy_to_host(&value, m.data() + bad, 1);
  throw Error(concat("moe::Layer::", where, ": ", name, "(", bad / m.cols(), ", ", bad % m.cols(),
                     ")=", value, " is not finite, expected finite values (check_finite=true)"));
}

// Runs a forward or backward past its checks. A failure there may strike one
// process between the group's collectives: group.fail ends them all rather
// than leave the others waiting (one process: an Error, out of memory too).
template <class Body>
void run_or_fail(const ProcessGroup& group, const char* where, Index tokens,
                 const LayerConfig& config, const char* aftermath, Body&& body) {
  try {
    body();
  } catch (const std::bad_alloc&) {
    group.fail(concat("moe::Layer::", where, ": out of memory for x.rows()=", tokens,
                      " tokens (experts=", config.experts, ", d_ff=", config.d_ff,
                      "), expected a batch whose buffers fit in memory; ", aftermath));
  } catch (const Error& e) {
    if (group.size() == 1) throw;
    group.fail(e.what());
  }
}

// What every process of a group must share (compared at construction): the
// shape, the options, the policies' names, the seed, k and the scalar type.
template <class Router, class Estimator, class Activation, class Scalar>
std::array<double, 13> layer_fingerprint(const LayerConfig& config, std::uint64_t seed,
                                         Index nominal_k) {
  const auto name = [](std::string_view s) {  // FNV-1a of a name, 53 bits: exact in a double
    std::uint64_t h = 0xcbf29ce484222325ull;
    for (const char ch : s) h = (h ^ static_cast<unsigned char>(ch)) * 0x100000001b3ull;
    return static_cast<double>(h >> 11);
  };
  return {static_cast<double>(config.experts),
          static_cast<double>(config.d_model),
          static_cast<double>(config.d_ff),
          config.expert_bias ? 1.0 : 0.0,
          config.capacity_factor,
          config.dropout,
          static_cast<double>(seed >> 32),
          static_cast<double>(seed & 0xFFFFFFFFull),
          static_cast<double>(nominal_k),
          name(Router::kName),
          name(Estimator::kName),
          name(Activation::kName),
          static_cast<double>(sizeof(Scalar))};
}

}  // namespace moe::detail
