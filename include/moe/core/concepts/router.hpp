#pragma once
#include <concepts>
#include <cstdint>

#include "moe/core/concepts/backend.hpp"
#include "moe/core/context.hpp"
#include "moe/core/tensor_buffer.hpp"

namespace moe {

// A router (ALGORITHMS.md section 3): owns its parameters in the layer's flat
// buffer, fills a Selection (gates for every (t, e), the selected pairs and its
// aux loss) in forward, and in backward maps dL/dG for every (t, e) to dL/dx
// (accumulated) and its parameter gradients, including its aux loss gradient.
template <class R, class B>
concept RouterPolicy = BackendPolicy<B> &&
    requires(const R& r, const B& be, const LayerConfig& cfg, TensorLayout& layout,
             TensorBuffer<typename B::Scalar>& params, Mode mode,
             ConstMatrixView<typename B::Scalar> x, const ForwardContext& ctx,
             Selection<typename B::Scalar, B::template Buffer>& sel,
             typename R::template Cache<B>& cache, const typename B::Scalar* dgates,
             typename B::Scalar* dx, typename B::Scalar* scratch) {
  { R::kName } -> std::convertible_to<const char*>;
  r.validate(cfg);  // throws moe::Error on bad options
  { r.nominal_k() } -> std::convertible_to<Index>;
  r.add_parameters(layout, cfg);
  r.init(params, cfg, std::uint64_t{0});
  r.forward(be, mode, x, std::as_const(params), ctx, sel, cache);
  r.backward(be, x, std::as_const(params), std::as_const(sel), std::as_const(cache), dgates, dx,
             params, scratch);
};

}  // namespace moe
