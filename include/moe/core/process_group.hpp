#pragma once
// The processes that share one batch. A layer whose experts are sharded over
// processes (moe::mpi::ExpertParallel) routes each process's own tokens, but
// its routers' and estimators' statistics are over the whole batch: load
// balancing counts c_e, the number of tokens T, ACMoE's cluster statistics,
// Default MoE's batch means, ReMoE's sparsity. They sum their per-process
// parts through the group. One process (the default) is its own group, where
// every call returns at once and changes nothing.
//
// Every process of a group makes the same calls in the same order (they are
// collectives), and every process gets the same bits back.

#include <exception>
#include <string>
#include <vector>

#include "moe/core/config.hpp"
#include "moe/core/error.hpp"

namespace moe {

class ProcessGroup {
 public:
  virtual ~ProcessGroup() = default;
  virtual int size() const = 0;
  virtual int rank() const = 0;
  // all[r * n + i] = process r's mine[i], on every process.
  virtual void all_gather(const double* mine, Index n, double* all) const = 0;
  // values[i] = the sum (exact) or the largest of the processes' values[i].
  virtual void sum(Index* values, Index n) const = 0;
  virtual void max(Index* values, Index n) const = 0;
  // Ends every process of the group with `reason` (never returns): for
  // processes that no longer agree on what their collectives are.
  [[noreturn]] virtual void abort(const std::string& reason) const = 0;

  // values[i] = the sum over the processes of their values[i], added in
  // process order: the same bits on every process and in every run.
  void sum(double* values, Index n) const {
    if (size() == 1) return;
    std::vector<double> all(static_cast<std::size_t>(n * size()));
    all_gather(values, n, all.data());
    for (Index i = 0; i < n; ++i) {
      double total = all[static_cast<std::size_t>(i)];
      for (int r = 1; r < size(); ++r) total += all[static_cast<std::size_t>(r * n + i)];
      values[i] = total;
    }
  }
  double sum(double value) const {
    sum(&value, 1);
    return value;
  }
  Index sum(Index value) const {
    sum(&value, 1);
    return value;
  }
  Index max(Index value) const {
    max(&value, 1);
    return value;
  }

  // A failure between the group's collectives, on this process alone: an
  // Error with one process; with several, the end of them all (the others
  // would wait for this one in their next collective forever).
  [[noreturn]] void fail(const std::string& reason) const {
    if (size() == 1) throw Error(reason);
    abort(reason);
    std::terminate();  // not reached; GCC does not see a virtual call's [[noreturn]]
  }

  // Whether every process passed true.
  bool all(bool ok) const {
    Index refusals = ok ? 0 : 1;
    sum(&refusals, 1);
    return refusals == 0;
  }

  // Every process must hold the same values (a layer's shape, options and
  // seed; a forward's mode and k): a difference is fatal (abort), since the
  // processes' collectives would no longer match. `what` names the values.
  void require_same(const double* values, Index n, const std::string& what) const {
    if (size() == 1) return;
    std::vector<double> all(static_cast<std::size_t>(n * size()));
    all_gather(values, n, all.data());
    for (int r = 1; r < size(); ++r)
      for (Index i = 0; i < n; ++i)
        if (all[static_cast<std::size_t>(r * n + i)] != all[static_cast<std::size_t>(i)])
          abort(detail::concat(what, ": process ", r, " has value ", i, " = ",
                               all[static_cast<std::size_t>(r * n + i)], ", process 0 has ",
                               all[static_cast<std::size_t>(i)],
                               ", expected the same on every process of the group"));
  }

  // Runs `checks` (which throw on bad input) so that a refusal on any
  // process is an exception on every process, before any collective call:
  // no process is left waiting in a collective for one that threw. The
  // refusing process rethrows its own exception; the others throw an Error
  // naming `where`.
  template <class Checks>
  void agree(const char* where, Checks&& checks) const {
    if (size() == 1) {
      checks();
      return;
    }
    std::exception_ptr refusal;
    try {
      checks();
    } catch (...) {
      refusal = std::current_exception();
    }
    if (all(refusal == nullptr)) return;
    if (refusal) std::rethrow_exception(refusal);
    throw Error(detail::concat(where,
                               ": another process of the group refused its part of the "
                               "call (its own error says why); this process's was valid"));
  }
};

// One process alone.
class SingleProcess final : public ProcessGroup {
 public:
  int size() const override { return 1; }
  int rank() const override { return 0; }
  void all_gather(const double* mine, Index n, double* all) const override {
    for (Index i = 0; i < n; ++i) all[i] = mine[i];
  }
  void sum(Index*, Index) const override {}
  void max(Index*, Index) const override {}
  [[noreturn]] void abort(const std::string& reason) const override { throw Error(reason); }
  using ProcessGroup::max;
  using ProcessGroup::sum;
};

inline const ProcessGroup& single_process() {
  static const SingleProcess group;
  return group;
}

}  // namespace moe
