#pragma once
// moe::nccl::Group: a ProcessGroup over an NCCL communicator, for layers on
// the CUDA backend. The caller creates the communicator (ncclCommInitRank,
// its unique id usually shared over MPI) and destroys it after the layers
// that use it. Each call runs on the group's own stream and waits for it:
// the backend's primitives have finished (they synchronise) before it, and
// its results are on the host after it.
//
// Sums of doubles are ncclAllGather followed by a sum in rank order on
// every process (ProcessGroup::sum): the same bits everywhere.

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

#include "moe/backend/cuda/check.cuh"
#include "moe/core/error.hpp"
#include "moe/core/process_group.hpp"

namespace moe::nccl {

inline void check(ncclResult_t result, const char* what) {
  if (result != ncclSuccess)
    throw Error(moe::detail::concat("moe::nccl: ", what, " failed: ", ncclGetErrorString(result)));
}

// The NCCL datatype of T (float, double, bf16, 64-bit integers).
template <class T>
ncclDataType_t datatype() {
  if constexpr (std::is_same_v<T, float>)
    return ncclFloat32;
  else if constexpr (std::is_same_v<T, double>)
    return ncclFloat64;
  else if constexpr (std::is_same_v<T, __nv_bfloat16>)
    return ncclBfloat16;
  else {
    static_assert(std::is_same_v<T, Index>, "moe::nccl::datatype: float, double, bf16 or Index");
    return ncclInt64;
  }
}

class Group final : public ProcessGroup {
 public:
  explicit Group(ncclComm_t comm) : comm_(comm), stream_(make_stream()) {
    moe::detail::require(comm != nullptr,
                         "moe::nccl::Group: comm=nullptr, expected an NCCL "
                         "communicator (ncclCommInitRank)");
    check(ncclCommCount(comm_, &size_), "ncclCommCount");
    check(ncclCommUserRank(comm_, &rank_), "ncclCommUserRank");
  }

  int size() const override { return size_; }
  int rank() const override { return rank_; }
  ncclComm_t comm() const { return comm_; }
  cudaStream_t stream() const { return *stream_; }

  void all_gather(const double* mine, Index n, double* all) const override {
    Device<double> send(n), recv(n * size_);
    copy(send.data, mine, n);
    check(ncclAllGather(send.data, recv.data, static_cast<std::size_t>(n), ncclFloat64, comm_,
                        *stream_),
          "ncclAllGather");
    copy(all, recv.data, n * size_);
  }
  void sum(Index* values, Index n) const override { reduce(values, n, ncclSum, "ncclAllReduce"); }
  void max(Index* values, Index n) const override { reduce(values, n, ncclMax, "ncclAllReduce"); }
  [[noreturn]] void abort(const std::string& reason) const override {
    std::fprintf(stderr, "moe::nccl (rank %d of %d): %s\n", rank_, size_, reason.c_str());
    std::fflush(stderr);
    ncclCommAbort(comm_);
    std::abort();
  }
  using ProcessGroup::max;
  using ProcessGroup::sum;

 private:
  // A device array for one call (the values are small: counts, statistics).
  template <class T>
  struct Device {
    explicit Device(Index n) {
      cuda::detail::check(
          cudaMalloc(&data, static_cast<std::size_t>(std::max<Index>(n, 1)) * sizeof(T)),
          "cudaMalloc (moe::nccl::Group)");
    }
    ~Device() { cudaFree(data); }
    T* data = nullptr;
  };

  template <class T>
  void copy(T* to, const T* from, Index n) const {
    cuda::detail::check(cudaMemcpyAsync(to, from, static_cast<std::size_t>(n) * sizeof(T),
                                        cudaMemcpyDefault, *stream_),
                        "cudaMemcpyAsync (moe::nccl::Group)");
    cuda::detail::check(cudaStreamSynchronize(*stream_), "cudaStreamSynchronize (moe::nccl)");
  }

  void reduce(Index* values, Index n, ncclRedOp_t op, const char* what) const {
    Device<Index> buffer(n);
    copy(buffer.data, values, n);
    check(ncclAllReduce(buffer.data, buffer.data, static_cast<std::size_t>(n), ncclInt64, op, comm_,
                        *stream_),
          what);
    copy(values, buffer.data, n);
  }

  static std::shared_ptr<cudaStream_t> make_stream() {
    auto* stream = new cudaStream_t;
    cuda::detail::check(cudaStreamCreateWithFlags(stream, cudaStreamNonBlocking),
                        "cudaStreamCreate (moe::nccl::Group)");
    return std::shared_ptr<cudaStream_t>(stream, [](cudaStream_t* s) {
      cudaStreamDestroy(*s);
      delete s;
    });
  }

  ncclComm_t comm_;
  std::shared_ptr<cudaStream_t> stream_;
  int size_ = 1;
  int rank_ = 0;
};

}  // namespace moe::nccl
