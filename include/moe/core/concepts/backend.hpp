#pragma once
#include <concepts>
#include <cstddef>
#include <memory_resource>
#include <vector>

#include "moe/core/config.hpp"
#include "moe/core/routing.hpp"

namespace moe {
namespace detail {

// What parallel_for takes: a function of the index, callable on host and
// device. (A named type: nvcc rejects a lambda inside a requires-expression.)
struct IndexFunction {
  MOE_HOST_DEVICE void operator()(Index) const {}
};

// What parallel_for_rows takes: f(row, begin, end) for columns [begin, end).
struct RowSpanFunction {
  MOE_HOST_DEVICE void operator()(Index, Index, Index) const {}
};

// What parallel_sum_rows takes: a term(i, j) and a store(i, sum).
struct SumTerm {
  MOE_HOST_DEVICE float operator()(Index, Index) const { return 0; }
};
struct SumStore {
  MOE_HOST_DEVICE void operator()(Index, float) const {}
};

}  // namespace detail

// An expert backend: memory (Buffer, and the memory resource of the layer's
// parameter, gradient and state buffers), a row-major GEMM, parallel loops
// over independent work items (whole items, spans of a row's columns, and
// one sum per item) and the dispatch of selected pairs by expert.
// Every primitive returns with its results visible to the host: the layer's
// bookkeeping (expert counts, loss terms) reads them there.
template <class B>
concept BackendPolicy = requires(const B& be, const typename B::Scalar* a, typename B::Scalar* c,
                                 typename B::Scalar s, Index n,
                                 const Selection<typename B::Scalar, B::template Buffer>& sel,
                                 Dispatch<B::template Buffer>& dispatch) {
  typename B::Scalar;
  typename B::template Buffer<typename B::Scalar>;
  { B::kName } -> std::convertible_to<const char*>;
  { be.threads() } -> std::convertible_to<int>;
  { be.memory_resource() } -> std::convertible_to<std::pmr::memory_resource*>;
  be.copy_to_host(c, a, n);
  be.gemm(false, false, n, n, n, s, a, n, a, n, s, c, n);
  be.gemm_rows(false, n, n, n, s, a, n, a, n, s, c, n);
  be.grouped_gemm(std::vector<Index>{}, false, n, n, a, a, n, s, c);
  be.grouped_gemm_tn(std::vector<Index>{}, n, n, a, a, c, n);
  { be.first_non_finite(a, n) } -> std::convertible_to<Index>;
  {
    be.offsets_from_counts(static_cast<const Index*>(nullptr), n, static_cast<Index*>(nullptr))
    } -> std::convertible_to<Index>;
  // The loops take a last argument, the work (about the flops) of the whole
  // loop: a CPU backend decides from it whether threads pay off.
  be.parallel_for(n, detail::IndexFunction{}, n);
  be.parallel_for_rows(n, n, detail::RowSpanFunction{}, n);
  be.parallel_sum_rows(n, n, detail::SumTerm{}, detail::SumStore{}, n);
  be.dispatch(sel, n, dispatch);
};

namespace archetype {

// The least a backend must provide, declared but never defined: policies
// static_assert their concept against it right under their definition.
struct Backend {
  using Scalar = double;
  template <class U>
  struct Buffer {
    U* data();
    const U* data() const;
    std::size_t size() const;
    void resize(std::size_t);
    U& operator[](std::size_t);
    const U& operator[](std::size_t) const;
  };
  static constexpr const char* kName = "archetype";
  int threads() const;
  std::pmr::memory_resource* memory_resource() const;
  void copy_to_host(double*, const double*, Index) const;
  void gemm(bool, bool, Index, Index, Index, double, const double*, Index, const double*, Index,
            double, double*, Index) const;
  void gemm_rows(bool, Index, Index, Index, double, const double*, Index, const double*, Index,
                 double, double*, Index) const;
  void grouped_gemm(const std::vector<Index>&, bool, Index, Index, const double*, const double*,
                    Index, double, double*) const;
  void grouped_gemm_tn(const std::vector<Index>&, Index, Index, const double*, const double*,
                       double*, Index) const;
  Index first_non_finite(const double*, Index) const;
  Index offsets_from_counts(const Index*, Index, Index*) const;
  template <class F>
  void parallel_for(Index, F&&, Index) const;
  template <class F>
  void parallel_for_rows(Index, Index, F&&, Index) const;
  template <class Term, class Store>
  void parallel_sum_rows(Index, Index, Term&&, Store&&, Index) const;
  template <class S>
  void dispatch(const Selection<S, Buffer>&, Index, Dispatch<Buffer>&) const;
};

}  // namespace archetype
}  // namespace moe
