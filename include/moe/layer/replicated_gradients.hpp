#pragma once
// Data-parallel gradients of an expert-parallel layer (dispatchers over
// processes: moe::mpi::ExpertParallel, moe::nccl::ExpertParallel): the router's
// parameters are replicated on every process, and each process's backward
// adds the gradient of its own tokens only. sum_replicated_gradients() sums
// those tensors over the processes (in rank order, in double: every process
// gets the same bits, so replicated weights stay identical after identical
// optimiser steps). The experts' gradients stay where their experts live.

#include <string>
#include <vector>

#include "moe/core/error.hpp"
#include "moe/core/process_group.hpp"
#include "moe/core/tensor_buffer.hpp"

namespace moe {

// grads (from layer.make_gradients(), after the backwards of a step) ->
// the router's tensors hold the sum over every process's batch: what one
// process holding the whole batch would have. Every process calls it; with
// one process it changes nothing.
template <class Layer>
void sum_replicated_gradients(const Layer& layer, typename Layer::Parameters& grads) {
  const ProcessGroup& group = layer.dispatcher().group();
  group.agree("moe::sum_replicated_gradients", [&] {
    moe::detail::require(grads.same_layout(layer.parameters()),
                         "moe::sum_replicated_gradients: grads has size ", grads.size(),
                         " and another layout, expected layer.make_gradients() (size ",
                         layer.parameters().size(), ")");
  });
  if (group.size() == 1) return;  // its own sum
  std::vector<double> values;
  for (const TensorSpec& spec : grads.layout().specs()) {
    if (Layer::is_expert_tensor(spec.name)) continue;
    auto tensor = grads[spec.name];
    values.assign(tensor.begin(), tensor.end());
    group.sum(values.data(), static_cast<Index>(values.size()));
    for (std::size_t i = 0; i < values.size(); ++i)
      tensor[i] = static_cast<typename Layer::Scalar>(values[i]);
  }
}

}  // namespace moe
