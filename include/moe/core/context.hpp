#pragma once
// What a forward may take from outside the layer, beyond x.

#include <span>

namespace moe {

struct ForwardContext {
  // The previous MoE layer's top-1 expert of each token (its
  // cache.top1_assignment()), for routers that cluster by it (ACMoE). Empty:
  // there is none (the first MoE layer). Entries of -1 mean "no expert".
  std::span<const int> previous_assignment;
};

}  // namespace moe
