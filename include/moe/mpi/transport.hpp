#pragma once
// moe::mpi::Transport: how dispatch::ExpertParallel moves rows over MPI, for
// the CPU backend (host memory). Rows travel by MPI_Alltoallv in a datatype
// of one row (MPI_Type_contiguous), so counts and offsets are in rows and
// stay within MPI's int for any row width.

#include <mpi.h>

#include <vector>

#include "moe/core/config.hpp"
#include "moe/mpi/group.hpp"

namespace moe::mpi {

class Transport {
 public:
  static constexpr const char* kName = "mpi_expert_parallel";

  // MPI must be initialised; the transport works on its own duplicate of
  // `comm` (see Group).
  Transport(MPI_Comm comm) : group_(comm) {}  // NOLINT: implicit, ExpertParallel(comm)

  const Group& group() const { return group_; }

  // recv (rows from each process, in rank order) = what each process's
  // send holds for this one. Counts and offsets in rows of `width` values.
  template <class T>
  void all_to_all(const T* send, const std::vector<int>& send_rows,
                  const std::vector<int>& send_offsets, T* recv, const std::vector<int>& recv_rows,
                  const std::vector<int>& recv_offsets, Index width) const {
    MPI_Datatype row;
    MPI_Type_contiguous(count_of(width, "row width"), datatype<T>(), &row);
    MPI_Type_commit(&row);
    MPI_Alltoallv(send, send_rows.data(), send_offsets.data(), row, recv, recv_rows.data(),
                  recv_offsets.data(), row, group_.comm());
    MPI_Type_free(&row);
  }

 private:
  Group group_;
};

}  // namespace moe::mpi
