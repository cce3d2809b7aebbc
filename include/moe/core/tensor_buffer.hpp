#pragma once
// TensorBuffer: one flat, contiguous buffer holding several named tensors.
// Parameters, their gradients and policy state use it, so any optimizer can
// step the whole layer as one array while code addresses "experts.w1" by name.

#include <algorithm>
#include <limits>
#include <memory>
#include <memory_resource>
#include <new>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "moe/core/error.hpp"
#include "moe/core/view.hpp"

namespace moe {

struct TensorSpec {
  std::string name;
  std::vector<Index> shape;
  Index offset = 0;  // in elements, into the flat buffer
  // False for tensors no optimizer may change (a frozen router): they keep a
  // (zero) gradient slot so that every buffer has one layout.
  bool trainable = true;

  Index size() const {
    Index n = 1;
    for (Index s : shape) n *= s;
    return n;
  }
};

// The names, shapes and offsets of a TensorBuffer; shared (immutable) between
// a parameter buffer and every gradient buffer made from it.
class TensorLayout {
 public:
  // Every size is checked: a shape whose element count, or a layout whose
  // total, would not fit an Index (so neither a byte count) is an error.
  void add(std::string name, std::vector<Index> shape, bool trainable = true) {
    detail::require(find(name) == nullptr, "moe::TensorLayout::add: duplicate tensor name '", name,
                    "'");
    Index size = 1;
    for (std::size_t i = 0; i < shape.size(); ++i) {
      const Index s = shape[i];
      detail::require(s >= 0, "moe::TensorLayout::add: '", name, "' of shape ", shape_string(shape),
                      ": dimension ", i, " = ", s, ", expected >= 0");
      detail::require(s == 0 || size <= kMaxElements / s, "moe::TensorLayout::add: '", name,
                      "' of shape ", shape_string(shape), " has more than 2^", kMaxBits,
                      " elements, expected a size the layer can allocate");
      size *= s;
    }
    detail::require(total_ <= kMaxElements - size, "moe::TensorLayout::add: '", name,
                    "' brings the buffer past 2^", kMaxBits, " elements (", total_, " + ", size,
                    "), expected a size the layer can allocate");
    TensorSpec spec{std::move(name), std::move(shape), total_, trainable};
    total_ += size;
    specs_.push_back(std::move(spec));
  }

  // At most 2^kMaxBits elements in a buffer: the bytes of 8-byte values fit
  // in an Index and a size_t.
  static constexpr int kMaxBits = 59;
  static constexpr Index kMaxElements = Index{1} << kMaxBits;

  static std::string shape_string(const std::vector<Index>& shape) {
    std::string out = "(";
    for (std::size_t i = 0; i < shape.size(); ++i)
      out += (i ? ", " : "") + std::to_string(shape[i]);
    return out + ")";
  }

  // Lookups take a string_view: a name never becomes a std::string (which
  // would allocate for names beyond the small-string buffer on every step).
  const TensorSpec* find(std::string_view name) const {
    auto it = std::find_if(specs_.begin(), specs_.end(),
                           [&](const TensorSpec& s) { return s.name == name; });
    return it == specs_.end() ? nullptr : &*it;
  }

  const TensorSpec& at(std::string_view name) const {
    const TensorSpec* spec = find(name);
    if (spec == nullptr) {
      std::string known;
      for (const auto& s : specs_) known += (known.empty() ? "" : ", ") + s.name;
      throw Error(
          detail::concat("moe::TensorLayout: no tensor named '", name, "' (has: ", known, ")"));
    }
    return *spec;
  }

  bool contains(std::string_view name) const { return find(name) != nullptr; }
  const std::vector<TensorSpec>& specs() const { return specs_; }
  Index total_size() const { return total_; }

  friend bool operator==(const TensorLayout& a, const TensorLayout& b) {
    if (a.specs_.size() != b.specs_.size()) return false;
    for (std::size_t i = 0; i < a.specs_.size(); ++i) {
      if (a.specs_[i].name != b.specs_[i].name || a.specs_[i].shape != b.specs_[i].shape ||
          a.specs_[i].trainable != b.specs_[i].trainable)
        return false;
    }
    return true;
  }

 private:
  std::vector<TensorSpec> specs_;
  Index total_ = 0;
};

namespace detail {

// A fixed-size array of trivially copyable values in a given memory resource
// (host memory by default; the CUDA backend's is managed memory, which its
// kernels and the host both address). Unlike std::pmr::vector, a copy
// constructed from an array lives in the same memory as its source, so a
// copied parameter or state buffer stays readable by the backend that made it
// (copy-assignment: see operator=).
template <class T>
class ResourceArray {
  static_assert(std::is_trivially_copyable_v<T>, "ResourceArray holds plain values");

 public:
  ResourceArray() = default;
  ResourceArray(std::size_t n, std::pmr::memory_resource* memory) : memory_(memory) {
    allocate(n);
    std::fill(data_, data_ + size_, T(0));
  }
  ResourceArray(const ResourceArray& other) : memory_(other.memory_) {
    allocate(other.size_);
    std::copy(other.data_, other.data_ + size_, data_);
  }
  ResourceArray(ResourceArray&& other) noexcept { swap(other); }
  ~ResourceArray() { release(); }
  // Keeps its own memory resource (a layer's parameters stay where its
  // backend reads them, whatever the source's), except that an empty array
  // takes the source's (a cache's first copy of the state). Reuses its
  // storage when the size matches: no allocation per step.
  ResourceArray& operator=(const ResourceArray& other) {
    if (this == &other) return *this;
    if (size_ != other.size_) {
      std::pmr::memory_resource* memory = size_ == 0 ? other.memory_ : memory_;
      release();
      memory_ = memory;
      allocate(other.size_);
    }
    std::copy(other.data_, other.data_ + size_, data_);
    return *this;
  }
  ResourceArray& operator=(ResourceArray&& other) noexcept {
    ResourceArray moved(std::move(other));
    swap(moved);
    return *this;
  }

  T* data() { return data_; }
  const T* data() const { return data_; }
  std::size_t size() const { return size_; }
  std::pmr::memory_resource* memory() const { return memory_; }

 private:
  void allocate(std::size_t n) {
    try {
      data_ = n == 0 ? nullptr : static_cast<T*>(memory_->allocate(n * sizeof(T), alignof(T)));
    } catch (const std::bad_alloc&) {
      throw Error(detail::concat("moe::TensorBuffer: cannot allocate ", n * sizeof(T), " bytes (",
                                 n, " values of ", sizeof(T),
                                 " bytes), expected a size this machine's memory holds"));
    }
    size_ = n;  // after the allocation, which may throw
  }
  void release() {
    if (data_ != nullptr) memory_->deallocate(data_, size_ * sizeof(T), alignof(T));
    data_ = nullptr;
    size_ = 0;
  }
  void swap(ResourceArray& other) noexcept {
    std::swap(data_, other.data_);
    std::swap(size_, other.size_);
    std::swap(memory_, other.memory_);
  }

  T* data_ = nullptr;
  std::size_t size_ = 0;
  std::pmr::memory_resource* memory_ = std::pmr::new_delete_resource();
};

}  // namespace detail

// Values live in `memory` (host memory unless a backend supplies its own, see
// BackendPolicy::memory_resource); the resource must outlive the buffer.
template <class T>
class TensorBuffer {
 public:
  TensorBuffer() : layout_(std::make_shared<const TensorLayout>()) {}
  explicit TensorBuffer(std::shared_ptr<const TensorLayout> layout,
                        std::pmr::memory_resource* memory = std::pmr::new_delete_resource())
      : layout_(std::move(layout)), data_(allocate(*layout_, memory)) {}

  // A zero buffer with the same layout in the same memory: the gradient
  // buffer of a parameter set.
  TensorBuffer zeros_like() const { return TensorBuffer(layout_, data_.memory()); }

  const TensorLayout& layout() const { return *layout_; }
  bool same_layout(const TensorBuffer& other) const {
    return layout_ == other.layout_ || *layout_ == *other.layout_;
  }
  bool contains(std::string_view name) const { return layout_->contains(name); }
  // Where the values live (see BackendPolicy::memory_resource).
  std::pmr::memory_resource* memory() const { return data_.memory(); }

  std::span<T> flat() { return {data_.data(), data_.size()}; }
  std::span<const T> flat() const { return {data_.data(), data_.size()}; }
  Index size() const { return static_cast<Index>(data_.size()); }

  std::span<T> operator[](std::string_view name) { return span_of(layout_->at(name)); }
  std::span<const T> operator[](std::string_view name) const { return span_of(layout_->at(name)); }

  // The tensor as a matrix: last dimension as columns, the rest as rows.
  MatrixView<T> matrix(std::string_view name) { return matrix_of(layout_->at(name), data_.data()); }
  MatrixView<const T> matrix(std::string_view name) const {
    return matrix_of(layout_->at(name), data_.data());
  }

  void set_zero() { std::fill(data_.data(), data_.data() + data_.size(), T(0)); }

 private:
  // The values of a layout, or an error that names its largest tensor.
  static detail::ResourceArray<T> allocate(const TensorLayout& layout,
                                           std::pmr::memory_resource* memory) {
    try {
      return detail::ResourceArray<T>(static_cast<std::size_t>(layout.total_size()), memory);
    } catch (const Error& e) {
      const TensorSpec* largest = nullptr;
      for (const auto& s : layout.specs())
        if (largest == nullptr || s.size() > largest->size()) largest = &s;
      if (largest == nullptr) throw;
      throw Error(detail::concat(e.what(), "; the largest tensor is '", largest->name, "' ",
                                 TensorLayout::shape_string(largest->shape)));
    }
  }

  template <class P>
  static MatrixView<P> matrix_of(const TensorSpec& s, P* base) {
    Index cols = s.shape.empty() ? 1 : s.shape.back();
    return {base + s.offset, cols == 0 ? 0 : s.size() / cols, cols};
  }
  std::span<T> span_of(const TensorSpec& s) {
    return {data_.data() + s.offset, static_cast<std::size_t>(s.size())};
  }
  std::span<const T> span_of(const TensorSpec& s) const {
    return {data_.data() + s.offset, static_cast<std::size_t>(s.size())};
  }

  std::shared_ptr<const TensorLayout> layout_;
  detail::ResourceArray<T> data_;
};

namespace detail {

// Every value of `buffer` finite, or an error naming the first that is not
// (its tensor and index), from `where`.
template <class T>
void require_finite(const TensorBuffer<T>& buffer, const std::string& where,
                    double bound = std::numeric_limits<double>::max()) {
  for (const TensorSpec& spec : buffer.layout().specs()) {
    const auto values = buffer[spec.name];
    for (std::size_t i = 0; i < values.size(); ++i) {
      const double v = static_cast<double>(values[i]);
      require(v - v == 0.0, where, ": ", spec.name, "[", i, "]=", v,
              ", expected finite values (NaN and Inf are refused)");
      require(v <= bound && v >= -bound, where, ": ", spec.name, "[", i, "]=", v,
              ", expected a magnitude of at most ", bound, " (the layer's scalar type's range)");
    }
  }
}

}  // namespace detail
}  // namespace moe
