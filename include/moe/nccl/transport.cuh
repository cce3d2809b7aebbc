#pragma once
// moe::nccl::Transport: how dispatch::ExpertParallel moves rows over NCCL,
// for the CUDA backend. NCCL has no all-to-all-v: it is one group of
// ncclSend/ncclRecv pairs, one per peer with rows to move (NCCL's own
// all-to-all pattern), on the group's stream, waited for before returning.

#include <nccl.h>

#include <vector>

#include "moe/core/config.hpp"
#include "moe/nccl/group.cuh"

namespace moe::nccl {

class Transport {
 public:
  static constexpr const char* kName = "nccl_expert_parallel";

  Transport(ncclComm_t comm) : group_(comm) {}  // NOLINT: implicit, ExpertParallel(comm)

  const Group& group() const { return group_; }

  // recv (rows from each process, in rank order) = what each process's
  // send holds for this one. Counts and offsets in rows of `width` values;
  // send and recv in device or managed memory.
  template <class T>
  void all_to_all(const T* send, const std::vector<int>& send_rows,
                  const std::vector<int>& send_offsets, T* recv, const std::vector<int>& recv_rows,
                  const std::vector<int>& recv_offsets, Index width) const {
    const auto w = static_cast<std::size_t>(width);
    check(ncclGroupStart(), "ncclGroupStart");
    // The group is always closed, so the first failure is checked after it.
    ncclResult_t queued = ncclSuccess;
    for (int r = 0; r < group_.size() && queued == ncclSuccess; ++r) {
      if (send_rows[r] > 0)
        queued = ncclSend(send + send_offsets[r] * w, send_rows[r] * w, datatype<T>(), r,
                          group_.comm(), group_.stream());
      if (queued == ncclSuccess && recv_rows[r] > 0)
        queued = ncclRecv(recv + recv_offsets[r] * w, recv_rows[r] * w, datatype<T>(), r,
                          group_.comm(), group_.stream());
    }
    const ncclResult_t ended = ncclGroupEnd();
    check(queued, "ncclSend/ncclRecv");
    check(ended, "ncclGroupEnd");
    cuda::detail::check(cudaStreamSynchronize(group_.stream()),
                        "cudaStreamSynchronize (moe::nccl::Transport)");
  }

 private:
  Group group_;
};

}  // namespace moe::nccl
