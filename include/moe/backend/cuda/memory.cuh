#pragma once
// Memory of the CUDA backend.
// - Managed memory (cudaMallocManaged) for everything the layer and its
//   policies keep: parameters, gradients, state (through ManagedMemoryResource)
//   and the per-batch buffers (ManagedBuffer). Kernels and the host address
//   the same pointers, so the layer's host bookkeeping (expert counts, loss
//   terms, the optimiser of the examples) runs unchanged; on sm_80/sm_90 the
//   pages live on the device while kernels use them.
// - DeviceScratch: plain device memory for the backend's own temporaries (CUB
//   temp storage, sort keys, bf16 copies), grown to the largest shape seen and
//   then reused: no allocation per step once the shapes repeat.

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <memory_resource>
#include <type_traits>
#include <utility>

#include "moe/backend/cuda/check.cuh"

namespace moe::cuda {

class ManagedMemoryResource final : public std::pmr::memory_resource {
 private:
  void* do_allocate(std::size_t bytes, std::size_t alignment) override {
    moe::detail::require(alignment <= 256,
                         "moe::cuda::ManagedMemoryResource: alignment=", alignment,
                         ", expected at most 256 (cudaMallocManaged's)");
    void* p = nullptr;
    detail::check(cudaMallocManaged(&p, std::max<std::size_t>(bytes, 1)), "cudaMallocManaged");
    return p;
  }
  void do_deallocate(void* p, std::size_t, std::size_t) noexcept override {
    cudaFree(p);  // cannot throw here; a failure shows at the next checked call
  }
  bool do_is_equal(const std::pmr::memory_resource& other) const noexcept override {
    return dynamic_cast<const ManagedMemoryResource*>(&other) != nullptr;
  }
};

inline ManagedMemoryResource* managed_memory() {
  static ManagedMemoryResource resource;
  return &resource;
}

// A resizable array in managed memory with the part of std::vector's interface
// the layer and the policies use. New elements are zero, as std::vector's.
template <class U>
class ManagedBuffer {
  static_assert(std::is_trivially_copyable_v<U>, "ManagedBuffer holds plain values");

 public:
  ManagedBuffer() = default;
  ManagedBuffer(const ManagedBuffer& other) { *this = other; }
  ManagedBuffer(ManagedBuffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)),
        size_(std::exchange(other.size_, 0)),
        capacity_(std::exchange(other.capacity_, 0)) {}
  ManagedBuffer& operator=(const ManagedBuffer& other) {
    if (this == &other) return *this;
    size_ = 0;  // nothing to keep: no copy of the old contents, no zero-fill
    reserve(other.size_);
    size_ = other.size_;
    if (size_ > 0) copy(data_, other.data_, size_);
    return *this;
  }
  ManagedBuffer& operator=(ManagedBuffer&& other) noexcept {
    std::swap(data_, other.data_);
    std::swap(size_, other.size_);
    std::swap(capacity_, other.capacity_);
    return *this;
  }
  ~ManagedBuffer() {
    if (data_ != nullptr) cudaFree(data_);
  }

  U* data() { return data_; }
  const U* data() const { return data_; }
  std::size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  U& operator[](std::size_t i) { return data_[i]; }
  const U& operator[](std::size_t i) const { return data_[i]; }
  U* begin() { return data_; }
  U* end() { return data_ + size_; }
  const U* begin() const { return data_; }
  const U* end() const { return data_ + size_; }

  // Grows the storage only when n exceeds every earlier size.
  void resize(std::size_t n) {
    reserve(n);
    if (n > size_) {
      detail::check(cudaMemset(data_ + size_, 0, (n - size_) * sizeof(U)), "cudaMemset");
      // Memsets and copies of managed memory may be asynchronous and run on
      // the legacy stream: finish them before the host or the backend's
      // stream touches the buffer.
      detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize (ManagedBuffer::resize)");
    }
    size_ = n;
  }
  void assign(std::size_t n, const U& value) {
    resize(n);
    std::fill(data_, data_ + n, value);  // host writes, before the next kernel
  }
  template <class It>
  void assign(It first, It last) {
    resize(static_cast<std::size_t>(std::distance(first, last)));
    std::copy(first, last, data_);
  }

 private:
  // Storage for at least n values, keeping the first size_.
  void reserve(std::size_t n) {
    if (n <= capacity_) return;
    U* grown = nullptr;
    detail::check(cudaMallocManaged(&grown, n * sizeof(U)), "cudaMallocManaged");
    try {
      if (size_ > 0) copy(grown, data_, size_);
    } catch (...) {
      cudaFree(grown);
      throw;
    }
    if (data_ != nullptr) cudaFree(data_);
    data_ = grown;
    capacity_ = n;
  }

  static void copy(U* dst, const U* src, std::size_t n) {
    detail::check(cudaMemcpy(dst, src, n * sizeof(U), cudaMemcpyDefault), "cudaMemcpy");
    detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize (ManagedBuffer copy)");
  }

  U* data_ = nullptr;
  std::size_t size_ = 0;
  std::size_t capacity_ = 0;
};

// Grow-only device memory, carved into aligned pieces by the caller.
class DeviceScratch {
 public:
  DeviceScratch() = default;
  DeviceScratch(const DeviceScratch&) = delete;
  DeviceScratch& operator=(const DeviceScratch&) = delete;
  ~DeviceScratch() {
    if (data_ != nullptr) cudaFree(data_);
  }

  // At least `bytes` of device memory; earlier contents are not kept.
  void* reserve(std::size_t bytes) {
    if (bytes > capacity_) {
      if (data_ != nullptr) detail::check(cudaFree(data_), "cudaFree");
      data_ = nullptr;
      capacity_ = 0;
      detail::check(cudaMalloc(&data_, bytes), "cudaMalloc");
      capacity_ = bytes;
    }
    return data_;
  }

 private:
  void* data_ = nullptr;
  std::size_t capacity_ = 0;
};

// Pieces of one scratch allocation, each aligned to 256 bytes: first the
// sizes are added (plan), then the base pointer is handed out (carve).
class ScratchPlan {
 public:
  template <class U>
  std::size_t add(std::size_t count) {
    const std::size_t offset = total_;
    total_ += (count * sizeof(U) + kAlign - 1) / kAlign * kAlign;
    return offset;
  }
  std::size_t bytes() const { return std::max<std::size_t>(total_, kAlign); }
  template <class U>
  static U* at(void* base, std::size_t offset) {
    return reinterpret_cast<U*>(static_cast<char*>(base) + offset);
  }

 private:
  static constexpr std::size_t kAlign = 256;
  std::size_t total_ = 0;
};

}  // namespace moe::cuda
