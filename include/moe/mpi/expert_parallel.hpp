#pragma once
// moe::mpi::ExpertParallel: a dispatch policy (moe::DispatchPolicy) whose E
// experts are sharded over the P processes of an MPI communicator, E / P
// consecutive experts each (process r holds [r E/P, (r+1) E/P)). Each
// process routes its own tokens; the rows travel to their experts' process
// and back with MPI_Alltoallv (docs/expert-parallel.md).
//
//   plan:        every process's per-expert counts (MPI_Allgather), from
//                which every process knows what it sends, what it
//                receives and which pairs the capacity keeps; the pairs'
//                global indices travel with the rows (dropout keys).
//   to_experts:  rows grouped by expert = grouped by destination process,
//                MPI_Alltoallv, then reordered from (source, expert) to
//                (expert, source).
//   to_tokens:   the reverse.
//
// The global batch is the processes' tokens in rank order. An expert's rows
// are then its tokens in the same order as one process holding the whole
// batch would take them, and the capacity keeps the same pairs, so a layer
// over P processes computes what one process computes on that batch.
//
// Host memory only (the CPU backend); the CUDA backend's counterpart is
// moe::nccl::ExpertParallel.

#include <mpi.h>

#include <algorithm>
#include <numeric>
#include <type_traits>
#include <vector>

#include "moe/core/concepts/dispatch.hpp"
#include "moe/core/error.hpp"
#include "moe/core/routing.hpp"
#include "moe/mpi/group.hpp"

namespace moe::mpi {

class ExpertParallel {
 public:
  static constexpr const char* kName = "mpi_expert_parallel";

  explicit ExpertParallel(MPI_Comm comm) : group_(comm) {}

  const Group& group() const { return group_; }

  // Process r's experts: [r E/P, (r+1) E/P). E must be divisible by P.
  ExpertRange local_experts(Index experts) const {
    const Index P = group_.size();
    moe::detail::require(experts % P == 0, "moe::mpi::ExpertParallel: experts=", experts, " over ",
                         P, " processes, expected a multiple of the process count");
    return {group_.rank() * (experts / P), experts / P};
  }

  template <class B>
  class Cache {
   public:
    const Dispatch<B::template Buffer>& tokens() const { return tokens_; }
    const Dispatch<B::template Buffer>& experts() const { return experts_; }

    // What this process sent to and received from each process in its last
    // forward, in rows (of d_model values each direction).
    const std::vector<int>& sent_rows() const { return send_counts_; }
    const std::vector<int>& received_rows() const { return recv_counts_; }

   private:
    friend class ExpertParallel;
    using S = typename B::Scalar;
    Dispatch<B::template Buffer> tokens_;   // this process's pairs, all E experts
    Dispatch<B::template Buffer> experts_;  // the rows of this process's experts
    std::vector<int> send_counts_, send_offsets_, recv_counts_, recv_offsets_;
    std::vector<Index> expert_row_;   // (received rows) row on the experts' side, in arrival order
    mutable std::vector<S> staging_;  // rows in arrival order
  };

  template <class B>
  void plan(const B& be, const Selection<typename B::Scalar, B::template Buffer>& pairs,
            Index capacity, Cache<B>& cache) const {
    static_assert(std::is_same_v<typename B::template Buffer<int>, std::vector<int>>,
                  "moe::mpi::ExpertParallel moves host memory: use the CPU backend "
                  "(moe::nccl::ExpertParallel for CUDA)");
    const Index P = group_.size(), E = pairs.experts, local = E / P;
    be.dispatch(pairs, -1, cache.tokens_);  // every pair, grouped by expert
    const Counts counts = exchange_counts(cache.tokens_.selected_per_expert, E);
    const std::vector<Index> kept = kept_by_capacity(counts, capacity, E);
    keep(pairs, kept, E, cache.tokens_);
    exchange_plan(counts, kept, E, local, cache);
  }

  // The experts' side is a buffer of its own.
  template <class Rows>
  Rows& experts_side(Rows& /*rows*/, Rows& spare) const {
    return spare;
  }

  // rows (this process's rows, by expert) -> at_experts (this process's
  // experts' rows, by expert then source process).
  template <class B, class Rows>
  void to_experts(const B&, const Cache<B>& cache, const Rows& rows, Rows& at_experts,
                  Index width) const {
    auto& staging = cache.staging_;
    staging.resize(cache.expert_row_.size() * static_cast<std::size_t>(width));
    all_to_all(rows.data(), cache.send_counts_, cache.send_offsets_, staging.data(),
               cache.recv_counts_, cache.recv_offsets_, width);
    at_experts.resize(staging.size());
    for (std::size_t r = 0; r < cache.expert_row_.size(); ++r)
      std::copy_n(staging.data() + r * width, width,
                  at_experts.data() + cache.expert_row_[r] * width);
  }

  // at_experts -> rows, the reverse of to_experts.
  template <class B, class Rows>
  void to_tokens(const B&, const Cache<B>& cache, const Rows& at_experts, Rows& rows,
                 Index width) const {
    auto& staging = cache.staging_;
    staging.resize(cache.expert_row_.size() * static_cast<std::size_t>(width));
    for (std::size_t r = 0; r < cache.expert_row_.size(); ++r)
      std::copy_n(at_experts.data() + cache.expert_row_[r] * width, width,
                  staging.data() + r * width);
    rows.resize(static_cast<std::size_t>(cache.tokens_.rows() * width));
    all_to_all(staging.data(), cache.recv_counts_, cache.recv_offsets_, rows.data(),
               cache.send_counts_, cache.send_offsets_, width);
  }

 private:
  // counts[r * E + e]: pairs process r routed to expert e (before capacity).
  using Counts = std::vector<Index>;

  Counts exchange_counts(const std::vector<Index>& mine, Index E) const {
    const Index P = group_.size();
    Counts counts(static_cast<std::size_t>(P * E));
    MPI_Allgather(mine.data(), count_of(E, "experts"), MPI_INT64_T, counts.data(),
                  count_of(E, "experts"), MPI_INT64_T, group_.comm());
    for (Index i = 0; i < P * E; ++i)
      if (counts[i] < 0)
        group_.abort(moe::detail::concat("moe::mpi::ExpertParallel: process ", i / E,
                                         " sent a count of ", counts[i], " pairs for expert ",
                                         i % E, ", expected a count >= 0"));
    return counts;
  }

  // kept[r * E + e]: the pairs of process r that expert e computes. The
  // capacity keeps an expert's first pairs of the global batch (rank order,
  // then token order), as one process would.
  Counts kept_by_capacity(const Counts& counts, Index capacity, Index E) const {
    if (capacity < 0) return counts;
    Counts kept(counts.size());
    for (Index e = 0; e < E; ++e) {
      Index before = 0;  // pairs of expert e on lower ranks
      for (Index r = 0; r < group_.size(); ++r) {
        const Index n = counts[r * E + e];
        kept[r * E + e] = std::clamp<Index>(capacity - before, 0, n);
        before += n;
      }
    }
    return kept;
  }

  // Applies this process's per-expert limits to the tokens' side (every
  // pair grouped by expert, token order inside an expert): an expert keeps
  // its first kept[e] pairs. Row numbers, offsets and pair_row follow.
  template <class S, template <class> class Buffer>
  void keep(const Selection<S, Buffer>& pairs, const Counts& kept, Index E,
            Dispatch<Buffer>& d) const {
    const Index* limit = kept.data() + group_.rank() * E;
    Dispatch<Buffer> all = d;
    d.expert_offsets.assign(static_cast<std::size_t>(E + 1), 0);
    for (Index e = 0; e < E; ++e) {
      d.rows_per_expert[e] = limit[e];
      d.expert_offsets[e + 1] = d.expert_offsets[e] + limit[e];
    }
    d.row_offsets.assign(d.expert_offsets.begin(), d.expert_offsets.end());
    const Index rows = d.expert_offsets[E];
    d.row_pair.resize(static_cast<std::size_t>(rows));
    d.row_expert.resize(static_cast<std::size_t>(rows));
    d.row_token.resize(static_cast<std::size_t>(rows));
    std::fill(d.pair_row.begin(), d.pair_row.end(), Index{-1});
    for (Index e = 0; e < E; ++e)
      for (Index i = 0; i < limit[e]; ++i) {
        const Index from = all.expert_offsets[e] + i, to = d.expert_offsets[e] + i;
        d.row_pair[to] = all.row_pair[from];
        d.row_expert[to] = static_cast<int>(e);
        d.row_token[to] = all.row_token[from];
        d.pair_row[all.row_pair[from]] = to;
      }
    d.dropped = pairs.pairs() - rows;
  }

  // From everyone's counts and limits: the rows this process sends to and
  // receives from each process, the experts' side of its experts, and the
  // global pair index of each received row (exchanged with the rows).
  template <class B>
  void exchange_plan(const Counts& counts, const Counts& kept, Index E, Index local,
                     Cache<B>& cache) const {
    const Index P = group_.size(), me = group_.rank(), first = me * local;
    auto& c = cache;
    c.send_counts_.assign(static_cast<std::size_t>(P), 0);
    c.recv_counts_.assign(static_cast<std::size_t>(P), 0);
    for (Index r = 0; r < P; ++r)
      for (Index j = 0; j < local; ++j) {
        c.send_counts_[r] += static_cast<int>(kept[me * E + r * local + j]);
        c.recv_counts_[r] += static_cast<int>(kept[r * E + first + j]);
      }
    c.send_offsets_ = exclusive_prefix(c.send_counts_);
    c.recv_offsets_ = exclusive_prefix(c.recv_counts_);

    // The experts' side: local expert j's rows from process 0, then 1, ...
    auto& x = c.experts_;
    x.expert_offsets.assign(static_cast<std::size_t>(local + 1), 0);
    x.rows_per_expert.assign(static_cast<std::size_t>(local), 0);
    x.selected_per_expert.assign(static_cast<std::size_t>(local), 0);
    for (Index j = 0; j < local; ++j)
      for (Index r = 0; r < P; ++r) {
        x.rows_per_expert[j] += kept[r * E + first + j];
        x.selected_per_expert[j] += counts[r * E + first + j];
      }
    for (Index j = 0; j < local; ++j)
      x.expert_offsets[j + 1] = x.expert_offsets[j] + x.rows_per_expert[j];
    x.row_offsets.assign(x.expert_offsets.begin(), x.expert_offsets.end());
    const Index rows = x.expert_offsets[local];
    x.row_expert.resize(static_cast<std::size_t>(rows));
    for (Index j = 0; j < local; ++j)
      std::fill(x.row_expert.begin() + x.expert_offsets[j],
                x.row_expert.begin() + x.expert_offsets[j + 1], static_cast<int>(j));
    x.row_token.assign(static_cast<std::size_t>(rows), -1);  // tokens of other processes
    x.pair_token.clear();
    x.pair_row.clear();
    x.dropped = 0;

    // Arrival order (source r, then its rows by expert) -> experts' row.
    c.expert_row_.resize(static_cast<std::size_t>(rows));
    std::vector<Index> next(x.expert_offsets.begin(), x.expert_offsets.end() - 1);
    Index arrival = 0;
    for (Index r = 0; r < P; ++r)
      for (Index j = 0; j < local; ++j)
        for (Index i = 0; i < kept[r * E + first + j]; ++i) c.expert_row_[arrival++] = next[j]++;
    if (arrival != rows)
      group_.abort(moe::detail::concat("moe::mpi::ExpertParallel: ", arrival, " rows arrive for ",
                                       rows, " rows of the experts"));

    // Global pair index = the pairs of lower ranks + the local index: what
    // one process would number the pair (dropout keys).
    Index base = 0;
    for (Index r = 0; r < me; ++r)
      for (Index e = 0; e < E; ++e) base += counts[r * E + e];
    std::vector<Index> global_pair(c.tokens_.row_pair.begin(), c.tokens_.row_pair.end());
    for (Index& p : global_pair) p += base;
    std::vector<Index> arrived(static_cast<std::size_t>(rows));
    all_to_all(global_pair.data(), c.send_counts_, c.send_offsets_, arrived.data(), c.recv_counts_,
               c.recv_offsets_, 1);
    x.row_pair.resize(static_cast<std::size_t>(rows));
    for (Index r = 0; r < rows; ++r) x.row_pair[c.expert_row_[r]] = arrived[r];
  }

  static std::vector<int> exclusive_prefix(const std::vector<int>& counts) {
    std::vector<int> offsets(counts.size(), 0);
    std::exclusive_scan(counts.begin(), counts.end(), offsets.begin(), 0);
    return offsets;
  }

  // MPI_Alltoallv of rows of `width` values: counts and offsets in rows (a
  // contiguous datatype of one row keeps them within MPI's int).
  template <class T>
  void all_to_all(const T* send, const std::vector<int>& send_counts,
                  const std::vector<int>& send_offsets, T* recv,
                  const std::vector<int>& recv_counts, const std::vector<int>& recv_offsets,
                  Index width) const {
    MPI_Datatype row;
    MPI_Type_contiguous(count_of(width, "row width"), datatype<T>(), &row);
    MPI_Type_commit(&row);
    MPI_Alltoallv(send, send_counts.data(), send_offsets.data(), row, recv, recv_counts.data(),
                  recv_offsets.data(), row, group_.comm());
    MPI_Type_free(&row);
  }

  Group group_;
};

}  // namespace moe::mpi
