#pragma once
// dispatch::Local: every expert lives in this process. The experts' rows are
// the tokens' rows grouped by expert (the backend's counting sort), so the
// two sides are one buffer and moving rows between them is no work. A
// dispatcher for experts sharded over processes implements the same concept
// (moe::DispatchPolicy) with an all-to-all in to_experts and to_tokens.

#include "moe/core/concepts/backend.hpp"
#include "moe/core/concepts/dispatch.hpp"
#include "moe/core/routing.hpp"

namespace moe::dispatch {

struct Local {
  static constexpr const char* kName = "local";

  // One process: its own tokens are the batch, and it holds every expert.
  const ProcessGroup& group() const { return single_process(); }
  ExpertRange local_experts(Index experts) const { return {0, experts}; }

  template <class B>
  class Cache {
   public:
    const Dispatch<B::template Buffer>& tokens() const { return routing_; }
    const Dispatch<B::template Buffer>& experts() const { return routing_; }

   private:
    friend struct Local;
    Dispatch<B::template Buffer> routing_;
  };

  // Counting sort of the pairs by expert (token order inside an expert),
  // at most `capacity` pairs per expert (capacity < 0: all).
  template <class B>
  void plan(const B& be, const Selection<typename B::Scalar, B::template Buffer>& pairs,
            Index capacity, Cache<B>& cache) const {
    be.dispatch(pairs, capacity, cache.routing_);
  }

  // The experts' side of a buffer is the buffer itself.
  template <class Rows>
  Rows& experts_side(Rows& rows, Rows& /*spare*/) const {
    return rows;
  }
  // Both sides are the same buffer: nothing moves.
  template <class B, class Rows>
  void to_experts(const B&, const Cache<B>&, const Rows&, Rows&, Index) const {}
  template <class B, class Rows>
  void to_tokens(const B&, const Cache<B>&, const Rows&, Rows&, Index) const {}
};

static_assert(DispatchPolicy<Local, archetype::Backend>);

}  // namespace moe::dispatch
