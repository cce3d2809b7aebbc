#pragma once
// moe::mpi::Group: a ProcessGroup over an MPI communicator. It works on its
// own duplicate of the communicator (MPI_Comm_dup), so that its collectives
// never match the caller's messages, and frees it with the last copy.
//
// Sums of doubles are an MPI_Allgather followed by a sum in rank order on
// every process: the same bits on every process and in every run, and, for
// one process, the value itself. Counts are MPI_Allreduce over int64.

#include <mpi.h>

#include <climits>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <type_traits>

#include "moe/core/error.hpp"
#include "moe/core/process_group.hpp"

namespace moe::mpi {

// The MPI datatype of T (float, double, 64-bit integers).
template <class T>
MPI_Datatype datatype() {
  if constexpr (std::is_same_v<T, float>)
    return MPI_FLOAT;
  else if constexpr (std::is_same_v<T, double>)
    return MPI_DOUBLE;
  else {
    static_assert(std::is_same_v<T, Index>, "moe::mpi::datatype: float, double or moe::Index");
    return MPI_INT64_T;
  }
}

// MPI's counts are int: a count past it is an Error, not a wrap.
inline int count_of(Index n, const char* what) {
  moe::detail::require(n >= 0 && n <= INT_MAX, "moe::mpi: ", what, "=", n,
                       " does not fit MPI's int counts, expected at most ", INT_MAX);
  return static_cast<int>(n);
}

class Group final : public ProcessGroup {
 public:
  // MPI must be initialised (MPI_Init) and stay so while the group lives.
  explicit Group(MPI_Comm comm) : comm_(duplicate(comm)) {
    MPI_Comm_size(*comm_, &size_);
    MPI_Comm_rank(*comm_, &rank_);
  }

  int size() const override { return size_; }
  int rank() const override { return rank_; }
  MPI_Comm comm() const { return *comm_; }

  void all_gather(const double* mine, Index n, double* all) const override {
    MPI_Allgather(mine, count_of(n, "values"), MPI_DOUBLE, all, count_of(n, "values"), MPI_DOUBLE,
                  *comm_);
  }
  void sum(Index* values, Index n) const override {
    MPI_Allreduce(MPI_IN_PLACE, values, count_of(n, "values"), MPI_INT64_T, MPI_SUM, *comm_);
  }
  void max(Index* values, Index n) const override {
    MPI_Allreduce(MPI_IN_PLACE, values, count_of(n, "values"), MPI_INT64_T, MPI_MAX, *comm_);
  }
  [[noreturn]] void abort(const std::string& reason) const override {
    std::fprintf(stderr, "moe::mpi (rank %d of %d): %s\n", rank_, size_, reason.c_str());
    std::fflush(stderr);
    MPI_Abort(*comm_, 1);
    std::abort();  // MPI_Abort does not return
  }
  using ProcessGroup::max;
  using ProcessGroup::sum;

 private:
  static std::shared_ptr<MPI_Comm> duplicate(MPI_Comm comm) {
    int initialized = 0, finalized = 0;
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    moe::detail::require(
        initialized && !finalized,
        "moe::mpi::Group: MPI is not initialised, expected MPI_Init before the group");
    moe::detail::require(comm != MPI_COMM_NULL,
                         "moe::mpi::Group: comm=MPI_COMM_NULL, expected a "
                         "communicator");
    auto* dup = new MPI_Comm;
    MPI_Comm_dup(comm, dup);
    return std::shared_ptr<MPI_Comm>(dup, [](MPI_Comm* c) {
      int done = 0;
      MPI_Finalized(&done);
      if (!done) MPI_Comm_free(c);  // after MPI_Finalize there is nothing to free
      delete c;
    });
  }

  std::shared_ptr<MPI_Comm> comm_;
  int size_ = 1;
  int rank_ = 0;
};

}  // namespace moe::mpi
