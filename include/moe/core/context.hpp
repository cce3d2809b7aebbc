#pragma once
// What a forward may take from outside the layer, beyond x.

#include <span>

#include "moe/core/process_group.hpp"

namespace moe {

struct ForwardContext {
  // The previous MoE layer's top-1 expert of each token (its
  // cache.top1_assignment()), for routers that cluster by it (ACMoE). Empty:
  // there is none (the first MoE layer). Entries of -1 mean "no expert".
  std::span<const int> previous_assignment;
  // Set by the layer, not by its caller: the processes whose tokens make up
  // the batch (its dispatcher's group), over which routers sum their
  // statistics. Null: this process alone.
  const ProcessGroup* group = nullptr;
};

// The group of a forward (one process unless a dispatcher set another).
inline const ProcessGroup& group_of(const ForwardContext& context) {
  return context.group != nullptr ? *context.group : single_process();
}

}  // namespace moe
