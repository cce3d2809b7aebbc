#pragma once
// Non-owning row-major matrix views. Every public entry point takes views, so a
// caller can pass an Eigen row-major matrix, a std::vector with a shape, or
// device memory (CUDA backend) through one type.

#include <concepts>
#include <type_traits>

#include "moe/core/config.hpp"
#include "moe/core/error.hpp"

namespace moe {

template <class T>
class MatrixView {
 public:
  using Scalar = T;

  MatrixView() = default;
  MOE_HOST_DEVICE MatrixView(T* data, Index rows, Index cols)
      : data_(data), rows_(rows), cols_(cols) {}

  // From any row-major dense matrix with data()/rows()/cols() (Eigen::Matrix
  // with RowMajor, Eigen::Map, ...). Column-major storage is rejected at
  // compile time because the library's layout is (tokens, features).
  template <class M>
  requires(!std::is_same_v<std::remove_cvref_t<M>, MatrixView> &&
           requires(M & m) {
             { m.data() } -> std::convertible_to<T*>;
             m.rows();
             m.cols();
           }) MatrixView(M&& m)  // NOLINT(google-explicit-constructor): views convert implicitly
      : data_(m.data()), rows_(static_cast<Index>(m.rows())), cols_(static_cast<Index>(m.cols())) {
    using Plain = std::remove_cvref_t<M>;
    // A block or a Map with strides is not contiguous rows of cols_ values.
    if constexpr (requires {
                    m.outerStride();
                    m.innerStride();
                  }) {
      const bool contiguous = m.innerStride() == 1 && (rows_ <= 1 || m.outerStride() == cols_);
      detail::require(contiguous, "moe::MatrixView: a matrix with outerStride()=", m.outerStride(),
                      " and innerStride()=", m.innerStride(), ", expected contiguous rows (", cols_,
                      ", 1): pass a copy, e.g. Matrix(block)");
    }
    if constexpr (requires { Plain::IsRowMajor; }) {
      static_assert(
          Plain::IsRowMajor || Plain::ColsAtCompileTime == 1 || Plain::RowsAtCompileTime == 1,
          "moe::MatrixView needs row-major storage: use "
          "Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>");
    }
  }

  // A mutable view converts to a read-only one.
  template <class U>
  requires(std::is_same_v<const U, T> && !std::is_same_v<U, T>) MOE_HOST_DEVICE
      MatrixView(MatrixView<U> other)  // NOLINT
      : data_(other.data()), rows_(other.rows()), cols_(other.cols()) {}

  MOE_HOST_DEVICE T* data() const { return data_; }
  MOE_HOST_DEVICE Index rows() const { return rows_; }
  MOE_HOST_DEVICE Index cols() const { return cols_; }
  MOE_HOST_DEVICE Index size() const { return rows_ * cols_; }
  MOE_HOST_DEVICE T* row(Index r) const { return data_ + r * cols_; }
  MOE_HOST_DEVICE T& operator()(Index r, Index c) const { return data_[r * cols_ + c]; }

 private:
  T* data_ = nullptr;
  Index rows_ = 0;
  Index cols_ = 0;
};

template <class T>
using ConstMatrixView = MatrixView<const T>;

}  // namespace moe
