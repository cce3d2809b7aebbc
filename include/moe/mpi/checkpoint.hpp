#pragma once
// Checkpoints of an expert-parallel layer as one file that a single process
// can load (moe::io::load_layer on a layer with dispatch::Local), and that
// an expert-parallel layer over any P dividing E can load back:
//
//   save_layer: rank 0 gathers every process's experts (MPI_Gather, in rank
//               order = expert order) and writes the file with its own
//               router parameters and state (identical on every process).
//   load_layer: rank 0 reads and checks the file, then broadcasts the
//               router's parameters and the state (MPI_Bcast) and hands each
//               process its experts (MPI_Scatter).
//
// Every process calls them. A refusal (a missing file, a wrong layer) is an
// Error on every process, and leaves every process's layer unchanged.

#include <mpi.h>

#include <filesystem>
#include <memory>

#include "moe/io/checkpoint.hpp"
#include "moe/mpi/expert_parallel.hpp"

namespace moe::mpi {

// The parameters' layout of the same layer on one process: the expert
// tensors hold all E experts.
template <class Layer>
std::shared_ptr<TensorLayout> whole_layer_layout(const Layer& layer) {
  auto layout = std::make_shared<TensorLayout>();
  const Index E = layer.config().experts, local = layer.local_experts().count;
  for (const TensorSpec& spec : layer.parameters().layout().specs()) {
    auto shape = spec.shape;
    if (Layer::is_expert_tensor(spec.name)) shape[0] = shape[0] / local * E;
    layout->add(spec.name, shape, spec.trainable);
  }
  return layout;
}

template <class Layer>
void save_layer(const std::filesystem::path& path, const Layer& layer) {
  using Scalar = typename Layer::Scalar;
  const Group& group = layer.dispatcher().transport().group();
  const bool root = group.rank() == 0;
  const auto& mine = layer.parameters();
  TensorBuffer<Scalar> whole;
  group.agree("moe::mpi::save_layer", [&] {  // rank 0 alone allocates: all refuse together
    if (root) whole = TensorBuffer<Scalar>(whole_layer_layout(layer), mine.memory());
  });
  for (const TensorSpec& spec : mine.layout().specs()) {
    const auto part = mine[spec.name];
    if (Layer::is_expert_tensor(spec.name)) {
      MPI_Gather(part.data(), count_of(static_cast<Index>(part.size()), spec.name.c_str()),
                 datatype<Scalar>(), root ? whole[spec.name].data() : nullptr,
                 count_of(static_cast<Index>(part.size()), spec.name.c_str()), datatype<Scalar>(),
                 0, group.comm());
    } else if (root) {
      std::copy(part.begin(), part.end(), whole[spec.name].begin());
    }
  }
  group.agree("moe::mpi::save_layer", [&] {
    if (root) io::detail::write_layer(path, layer, whole);
  });
}

template <class Layer>
void load_layer(const std::filesystem::path& path, Layer& layer) {
  using Scalar = typename Layer::Scalar;
  const Group& group = layer.dispatcher().transport().group();
  const bool root = group.rank() == 0;
  TensorBuffer<Scalar> whole;
  TensorBuffer<double> state = layer.state().zeros_like();
  group.agree("moe::mpi::load_layer", [&] {
    if (!root) return;
    whole = TensorBuffer<Scalar>(whole_layer_layout(layer), layer.parameters().memory());
    io::detail::read_layer_tensors(io::detail::read_layer_file<Layer>(path), "", whole, state);
  });
  MPI_Bcast(state.flat().data(), count_of(state.size(), "state"), MPI_DOUBLE, 0, group.comm());
  auto params = layer.parameters().zeros_like();
  for (const TensorSpec& spec : params.layout().specs()) {
    auto part = params[spec.name];
    const int n = count_of(static_cast<Index>(part.size()), spec.name.c_str());
    if (Layer::is_expert_tensor(spec.name)) {
      MPI_Scatter(root ? whole[spec.name].data() : nullptr, n, datatype<Scalar>(), part.data(), n,
                  datatype<Scalar>(), 0, group.comm());
    } else {
      if (root) std::copy_n(whole[spec.name].begin(), part.size(), part.begin());
      MPI_Bcast(part.data(), n, datatype<Scalar>(), 0, group.comm());
    }
  }
  group.agree("moe::mpi::load_layer", [&] { layer.load_state(state); });
  std::copy(params.flat().begin(), params.flat().end(), layer.parameters().flat().begin());
}

}  // namespace moe::mpi
