#pragma once
// dispatch::ExpertParallel<Transport>: a dispatch policy whose E experts are
// sharded over the P processes of a group, E / P consecutive experts each
// (process r holds [r E/P, (r+1) E/P)). Each process routes its own tokens;
// the rows travel to their experts' process and back by the transport's
// all-to-all (MPI for the CPU backend: moe/mpi.hpp; NCCL for the CUDA
// backend: moe/nccl.cuh). docs/expert-parallel.md has the protocol, its
// cost and what it guarantees.
//
//   plan:        every process's per-expert counts (an all-gather), from
//                which every process knows what it sends, what it receives
//                and which pairs the capacity keeps; the pairs' global
//                indices travel to the experts (dropout keys).
//   to_experts:  rows grouped by expert, hence by destination process;
//                all-to-all; reordered from (source, expert) to (expert,
//                source).
//   to_tokens:   the reverse.
//
// The global batch is the processes' tokens in rank order. An expert's rows
// are then its tokens in the order one process holding the whole batch
// would take them, and the capacity keeps the same pairs, so a layer over P
// processes computes what one process computes on that batch.
//
// A Transport (moe::mpi::Transport, moe::nccl::Transport) has
//   kName, group() -> const ProcessGroup&, and
//   all_to_all(send, send_rows, send_offsets, recv, recv_rows, recv_offsets,
//              width): rows of `width` values in the backend's memory, counts
//              and offsets (in rows) per process.

#include <algorithm>
#include <cmath>
#include <concepts>
#include <numeric>
#include <utility>
#include <vector>

#include "moe/core/concepts/backend.hpp"
#include "moe/core/concepts/dispatch.hpp"
#include "moe/core/config.hpp"
#include "moe/core/error.hpp"
#include "moe/core/process_group.hpp"
#include "moe/core/routing.hpp"

namespace moe::dispatch {

namespace detail {
// Scatter (to[row[i]] = from[i]) or gather (to[i] = from[row[i]]) of n rows
// of `width` values, on the backend. (A free function: nvcc's device
// lambdas may not live in private members.)
template <class B, class T>
void move_rows(const B& be, const T* from, T* to, const Index* row, Index n, Index width,
               bool scatter) {
  be.parallel_for_rows(
      n, width,
      [=] MOE_HOST_DEVICE(Index i, Index begin, Index end) {
        const Index src = scatter ? i : row[i], dst = scatter ? row[i] : i;
        for (Index j = begin; j < end; ++j) to[dst * width + j] = from[src * width + j];
      },
      n * width);
}
}  // namespace detail

template <class Transport>
class ExpertParallel {
 public:
  static constexpr const char* kName = Transport::kName;

  // The transport's constructor arguments (an MPI_Comm; an ncclComm_t).
  template <class... Args>
  requires std::constructible_from<Transport, Args...>
  explicit ExpertParallel(Args&&... args) : transport_(std::forward<Args>(args)...) {}

  const ProcessGroup& group() const { return transport_.group(); }
  const Transport& transport() const { return transport_; }

  // Process r's experts: [r E/P, (r+1) E/P). E must be divisible by P.
  ExpertRange local_experts(Index experts) const {
    const Index P = group().size();
    moe::detail::require(experts % P == 0, "moe::dispatch::ExpertParallel: experts=", experts,
                         " over ", P, " processes, expected a multiple of the process count");
    return {group().rank() * (experts / P), experts / P};
  }

  template <class B>
  class Cache {
   public:
    const Dispatch<B::template Buffer>& tokens() const { return tokens_; }
    const Dispatch<B::template Buffer>& experts() const { return experts_; }

    // The rows this process sent to and received from each process in its
    // last forward (d_model values each, each way).
    const std::vector<int>& sent_rows() const { return send_rows_; }
    const std::vector<int>& received_rows() const { return recv_rows_; }

   private:
    friend class ExpertParallel;
    template <class U>
    using Buffer = typename B::template Buffer<U>;
    Dispatch<B::template Buffer> tokens_;   // this process's pairs, all E experts
    Dispatch<B::template Buffer> experts_;  // the rows of this process's experts
    std::vector<int> send_rows_, send_offsets_, recv_rows_, recv_offsets_;
    Buffer<Index> expert_row_;  // (received rows) row on the experts' side, in arrival order
    mutable Buffer<typename B::Scalar> staging_;  // rows in arrival order
  };

  template <class B>
  void plan(const B& be, const Selection<typename B::Scalar, B::template Buffer>& pairs,
            Index capacity, Cache<B>& cache) const {
    const Index E = pairs.experts;
    be.dispatch(pairs, -1, cache.tokens_);  // every pair, grouped by expert
    const Counts counts = exchange_counts(cache.tokens_.selected_per_expert, E);
    const Counts kept = kept_by_capacity(counts, capacity, E);
    // Every process checks the same total: all refuse together.
    moe::detail::require(std::accumulate(kept.begin(), kept.end(), Index{0}) <= 0x7fffffff,
                         "moe::dispatch::ExpertParallel: a batch of more than 2^31 - 1 rows over "
                         "the group, expected fewer (the transports' offsets are int)");
    keep(pairs.pairs(), kept, E, cache.tokens_);
    plan_exchange(counts, kept, E, cache);
    send_pair_indices(be, counts, E, cache);
  }

  // The experts' side is a buffer of its own.
  template <class Rows>
  Rows& experts_side(Rows& /*rows*/, Rows& spare) const {
    return spare;
  }

  // rows (this process's rows, by expert) -> at_experts (this process's
  // experts' rows, by expert then source process).
  template <class B, class Rows>
  void to_experts(const B& be, const Cache<B>& cache, const Rows& rows, Rows& at_experts,
                  Index width) const {
    auto& staging = cache.staging_;
    const Index n = static_cast<Index>(cache.expert_row_.size());
    staging.resize(static_cast<std::size_t>(n * width));
    transport_.all_to_all(rows.data(), cache.send_rows_, cache.send_offsets_, staging.data(),
                          cache.recv_rows_, cache.recv_offsets_, width);
    at_experts.resize(static_cast<std::size_t>(n * width));
    detail::move_rows(be, staging.data(), at_experts.data(), cache.expert_row_.data(), n, width,
                      true);
  }

  // at_experts -> rows, the reverse of to_experts.
  template <class B, class Rows>
  void to_tokens(const B& be, const Cache<B>& cache, const Rows& at_experts, Rows& rows,
                 Index width) const {
    auto& staging = cache.staging_;
    const Index n = static_cast<Index>(cache.expert_row_.size());
    staging.resize(static_cast<std::size_t>(n * width));
    detail::move_rows(be, at_experts.data(), staging.data(), cache.expert_row_.data(), n, width,
                      false);
    rows.resize(static_cast<std::size_t>(cache.tokens_.rows() * width));
    transport_.all_to_all(staging.data(), cache.recv_rows_, cache.recv_offsets_, rows.data(),
                          cache.send_rows_, cache.send_offsets_, width);
  }

 private:
  // counts[r * E + e]: pairs process r routed to expert e (before capacity).
  using Counts = std::vector<Index>;

  // Everyone's per-expert counts (exact in doubles up to 2^53).
  Counts exchange_counts(const std::vector<Index>& mine, Index E) const {
    const ProcessGroup& g = group();
    std::vector<double> values(mine.begin(), mine.end());
    std::vector<double> all(static_cast<std::size_t>(g.size() * E));
    g.all_gather(values.data(), E, all.data());
    Counts counts(all.size());
    for (std::size_t i = 0; i < all.size(); ++i) {
      if (!(all[i] >= 0 && all[i] <= 0x1p53 && all[i] == std::floor(all[i])))
        g.abort(moe::detail::concat("moe::dispatch::ExpertParallel: process ", i / E,
                                    " sent a count of ", all[i], " pairs for expert ", i % E,
                                    ", expected a whole count >= 0"));
      counts[i] = static_cast<Index>(all[i]);
    }
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
      for (Index r = 0; r < group().size(); ++r) {
        const Index n = counts[r * E + e];
        kept[r * E + e] = std::clamp<Index>(capacity - before, 0, n);
        before += n;
      }
    }
    return kept;
  }

  // Applies this process's per-expert limits to the tokens' side (every
  // pair grouped by expert, token order inside an expert): expert e keeps
  // its first kept[e] pairs. Rows, offsets and pair_row follow. Host loops
  // over the backend's buffers (host or managed memory).
  template <template <class> class Buffer>
  void keep(Index pair_count, const Counts& kept, Index E, Dispatch<Buffer>& d) const {
    const Index* limit = kept.data() + group().rank() * E;
    bool all_kept = true;
    for (Index e = 0; e < E; ++e) all_kept = all_kept && limit[e] == d.rows_per_expert[e];
    if (all_kept) return;  // no capacity, or none reached here
    const Dispatch<Buffer> all = d;
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
    d.dropped = pair_count - rows;
  }

  // From everyone's counts and limits: the rows this process sends to and
  // receives from each process, and the experts' side of its experts (local
  // expert j's rows from process 0, then 1, ...).
  template <class B>
  void plan_exchange(const Counts& counts, const Counts& kept, Index E, Cache<B>& c) const {
    const Index P = group().size(), me = group().rank(), local = E / P, first = me * local;
    Counts sent(static_cast<std::size_t>(P), 0), received(static_cast<std::size_t>(P), 0);
    for (Index r = 0; r < P; ++r)
      for (Index j = 0; j < local; ++j) {
        sent[r] += kept[me * E + r * local + j];
        received[r] += kept[r * E + first + j];
      }
    c.send_rows_ = int_counts(sent);
    c.recv_rows_ = int_counts(received);
    c.send_offsets_ = exclusive_prefix(c.send_rows_);
    c.recv_offsets_ = exclusive_prefix(c.recv_rows_);

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
    x.row_token.assign(static_cast<std::size_t>(rows), Index{-1});  // other processes' tokens
    x.pair_token.resize(0);
    x.pair_row.resize(0);
    x.dropped = 0;

    // Arrival order (source r, then its rows by expert) -> experts' row.
    c.expert_row_.resize(static_cast<std::size_t>(rows));
    std::vector<Index> next(x.expert_offsets.begin(), x.expert_offsets.end() - 1);
    Index arrival = 0;
    for (Index r = 0; r < P; ++r)
      for (Index j = 0; j < local; ++j)
        for (Index i = 0; i < kept[r * E + first + j]; ++i) c.expert_row_[arrival++] = next[j]++;
  }

  // The experts' row_pair: each row's pair index in the global batch (the
  // pairs of lower ranks, then the local index), what one process would
  // number it: the dropout keys. It travels with the rows.
  template <class B>
  void send_pair_indices(const B& be, const Counts& counts, Index E, Cache<B>& c) const {
    Index base = 0;
    for (Index r = 0; r < group().rank(); ++r)
      for (Index e = 0; e < E; ++e) base += counts[r * E + e];
    typename B::template Buffer<Index> global(c.tokens_.row_pair), arrived;
    for (auto& p : global) p += base;
    const Index rows = static_cast<Index>(c.expert_row_.size());
    arrived.resize(static_cast<std::size_t>(rows));
    transport_.all_to_all(global.data(), c.send_rows_, c.send_offsets_, arrived.data(),
                          c.recv_rows_, c.recv_offsets_, 1);
    c.experts_.row_pair.resize(static_cast<std::size_t>(rows));
    detail::move_rows(be, arrived.data(), c.experts_.row_pair.data(), c.expert_row_.data(), rows, 1,
                      true);
  }

  static std::vector<int> int_counts(const Counts& counts) {
    return std::vector<int>(counts.begin(), counts.end());  // the total was checked in plan
  }

  static std::vector<int> exclusive_prefix(const std::vector<int>& counts) {
    std::vector<int> offsets(counts.size(), 0);
    std::exclusive_scan(counts.begin(), counts.end(), offsets.begin(), 0);
    return offsets;
  }

  Transport transport_;
};

}  // namespace moe::dispatch
