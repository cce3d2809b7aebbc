#pragma once
// Checkpoints of TensorBuffers and layers in safetensors files.
//
// A layer is stored as its parameters, "<prefix>param.<name>" in the layer's
// scalar type, and its state, "<prefix>state.<name>" in F64: together they
// resume training bitwise (docs/checkpoints.md). Loading checks every
// tensor (present, dtype, shape) before anything is written, so a file that
// does not fit leaves the buffer or layer unchanged.

#include <algorithm>
#include <concepts>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "moe/core/error.hpp"
#include "moe/core/tensor_buffer.hpp"
#include "moe/io/safetensors.hpp"
#include "moe/layer.hpp"

namespace moe::io {

// What a checkpoint needs of a layer (moe::Layer has it).
template <class L>
concept CheckpointableLayer = requires(L& layer, const L& const_layer,
                                       const TensorBuffer<double>& state) {
  typename L::Scalar;
  { const_layer.parameters() } -> std::convertible_to<const TensorBuffer<typename L::Scalar>&>;
  { layer.parameters() } -> std::convertible_to<TensorBuffer<typename L::Scalar>&>;
  { const_layer.state() } -> std::convertible_to<const TensorBuffer<double>&>;
  layer.load_state(state);
};

// Every tensor of `buffer` as "<prefix><name>" with its spec's shape.
template <class T>
void add_buffer(SafetensorsWriter& writer, const std::string& prefix,
                const TensorBuffer<T>& buffer) {
  for (const TensorSpec& spec : buffer.layout().specs())
    writer.add<T>(prefix + spec.name, buffer[spec.name], spec.shape);
}

// Checks that every tensor of the buffer's layout is in the file as
// "<prefix><name>" with dtype_of<T>() and the spec's shape, and only then
// copies them, so the buffer is unchanged on error. Tensors of the file that
// the layout lacks are ignored here (a file may hold several buffers);
// load_layer() rejects them under its own prefixes.
template <class T>
void load_buffer(const Safetensors& file, const std::string& prefix, TensorBuffer<T>& buffer) {
  for (const TensorSpec& spec : buffer.layout().specs())
    file.check<T>(prefix + spec.name, spec.shape);
  for (const TensorSpec& spec : buffer.layout().specs())
    file.copy_to<T>(prefix + spec.name, buffer[spec.name], spec.shape);
}

namespace detail {

// A tensor under `prefix` in the file that the layout lacks means the file
// holds a layer of another configuration (a router bias, expert biases, an
// estimator's state): an error, not something to drop silently.
inline void require_no_extra(const Safetensors& file, const std::string& prefix,
                             const TensorLayout& layout, const char* what) {
  for (const std::string& name : file.names()) {
    if (name.compare(0, prefix.size(), prefix) != 0) continue;
    const std::string rest = name.substr(prefix.size());
    if (layout.contains(rest)) continue;
    std::string known;
    for (const TensorSpec& s : layout.specs()) known += (known.empty() ? "" : ", ") + s.name;
    throw Error(concat(file.source(), ": tensor '", name, "' has no counterpart in the layer's ",
                       what, " (", known, "): the file holds a layer of another configuration"));
  }
}

inline std::string param_prefix(const std::string& prefix) { return prefix + "param."; }
inline std::string state_prefix(const std::string& prefix) { return prefix + "state."; }

}  // namespace detail

namespace detail {
// These functions see one process's tensors: a layer whose experts are
// sharded over processes holds only its share (moe/mpi/checkpoint.hpp
// gathers and scatters them).
template <class Layer>
void require_one_process(const Layer& layer, const char* where) {
  if constexpr (requires { layer.dispatcher().group(); }) {
    const int processes = layer.dispatcher().group().size();
    moe::detail::require(processes == 1, where, ": the layer's experts are sharded over ",
                         processes,
                         " processes, expected a layer holding all of them (for a sharded "
                         "layer: moe::mpi::save_layer / load_layer, moe/mpi/checkpoint.hpp)");
  }
}
}  // namespace detail

template <CheckpointableLayer Layer>
void add_layer(SafetensorsWriter& writer, const Layer& layer, const std::string& prefix = "") {
  detail::require_one_process(layer, "moe::io::add_layer");
  add_buffer(writer, detail::param_prefix(prefix), layer.parameters());
  add_buffer(writer, detail::state_prefix(prefix), layer.state());
}

// Restores parameters and state from "<prefix>param.*" and "<prefix>state.*".
// Every tensor is checked first (present, dtype, shape; no tensor the layer
// lacks; every value finite), the state is validated by Layer::load_state,
// and the parameters are written last: on any Error the layer is unchanged.
namespace detail {
// Checks the file's "<prefix>param.*" and "<prefix>state.*" against the
// layouts of `params` and `state` (present, dtype, shape; nothing the
// layouts lack), then reads them and checks that the parameters are finite.
template <class Scalar>
void read_layer_tensors(const Safetensors& file, const std::string& prefix,
                        TensorBuffer<Scalar>& params, TensorBuffer<double>& state) {
  const std::string params_at = param_prefix(prefix);
  const std::string state_at = state_prefix(prefix);
  require_no_extra(file, params_at, params.layout(), "parameters");
  require_no_extra(file, state_at, state.layout(), "state");
  for (const TensorSpec& spec : params.layout().specs())
    file.check<Scalar>(params_at + spec.name, spec.shape);
  for (const TensorSpec& spec : state.layout().specs())
    file.check<double>(state_at + spec.name, spec.shape);
  load_buffer(file, params_at, params);
  moe::detail::require_finite(params, file.source() + " (parameters)");
  load_buffer(file, state_at, state);
}
}  // namespace detail

// Restores parameters and state from "<prefix>param.*" and "<prefix>state.*".
// Every tensor is checked first (present, dtype, shape; no tensor the layer
// lacks; every value finite), the state is validated by Layer::load_state,
// and the parameters are written last: on any Error the layer is unchanged.
template <CheckpointableLayer Layer>
void load_layer(const Safetensors& file, Layer& layer, const std::string& prefix = "") {
  detail::require_one_process(layer, "moe::io::load_layer");
  // Staged in copies: the layer changes only once everything has loaded.
  auto params = layer.parameters().zeros_like();
  TensorBuffer<double> state = layer.state().zeros_like();
  detail::read_layer_tensors(file, prefix, params, state);
  layer.load_state(state);  // checks the values, strong guarantee
  std::copy(params.flat().begin(), params.flat().end(), layer.parameters().flat().begin());
}

namespace detail {
inline constexpr const char* kLayerFormat = "moe.layer";

// The policies' names of a moe::Layer, for the metadata.
template <class L>
struct PolicyNames {
  static std::vector<std::pair<std::string, std::string>> get() { return {}; }
};
// Any dispatcher: a file is the same model however its experts were placed.
template <class Router, class Estimator, class Backend, class Activation, class Dispatcher>
struct PolicyNames<moe::Layer<Router, Estimator, Backend, Activation, Dispatcher>> {
  static std::vector<std::pair<std::string, std::string>> get() {
    return {{"router", Router::kName},
            {"estimator", Estimator::kName},
            {"activation", Activation::kName},
            {"scalar", dtype_name(dtype_of<typename Backend::Scalar>())}};
  }
};
}  // namespace detail

namespace detail {
// save_layer() with the parameters given apart from the layer (an
// expert-parallel layer's gathered experts).
template <CheckpointableLayer Layer>
void write_layer(const std::filesystem::path& path, const Layer& layer,
                 const TensorBuffer<typename Layer::Scalar>& params) {
  SafetensorsWriter writer;
  add_buffer(writer, param_prefix(""), params);
  add_buffer(writer, state_prefix(""), layer.state());
  writer.set_metadata("format", kLayerFormat);
  writer.set_metadata("format_version", "1");
  if constexpr (requires { layer.config(); }) {
    const auto& c = layer.config();
    writer.set_metadata("d_model", std::to_string(c.d_model));
    writer.set_metadata("d_ff", std::to_string(c.d_ff));
    writer.set_metadata("experts", std::to_string(c.experts));
    writer.set_metadata("expert_bias", c.expert_bias ? "true" : "false");
  }
  for (auto& [key, value] : PolicyNames<Layer>::get()) writer.set_metadata(key, value);
  writer.write(path);
}

// Reads a layer file and checks that it is one: "format" is "moe.layer"
// and the policies it names are the layer's.
template <CheckpointableLayer Layer>
Safetensors read_layer_file(const std::filesystem::path& path) {
  Safetensors file = Safetensors::read(path);
  const auto format = file.metadata().find("format");
  require(format != file.metadata().end() && format->second == kLayerFormat, file.source(),
          ": __metadata__ format=",
          format == file.metadata().end() ? "(none)" : "'" + format->second + "'", ", expected '",
          kLayerFormat, "' (a file written by moe::io::save_layer)");
  for (const auto& [key, value] : PolicyNames<Layer>::get()) {
    const auto saved = file.metadata().find(key);
    if (saved != file.metadata().end() && saved->second != value)
      throw Error(concat(file.source(), ": the file holds a layer with ", key, "=", saved->second,
                         ", this layer has ", key, "=", value));
  }
  return file;
}
}  // namespace detail

// One layer in one file, with metadata saying what it is: "format"
// ("moe.layer"), "format_version", the shape ("d_model", "d_ff", "experts",
// "expert_bias"), the policies' names ("router", "estimator", "activation")
// and "scalar". Written atomically (SafetensorsWriter::write).
template <CheckpointableLayer Layer>
void save_layer(const std::filesystem::path& path, const Layer& layer) {
  detail::require_one_process(layer, "moe::io::save_layer");
  detail::write_layer(path, layer, layer.parameters());
}

// Reads a file written by save_layer(): its "format" must be "moe.layer" and
// the policies it names must be the layer's (the same shapes under another
// activation or router would load silently, and mean something else); then
// as load_layer(file, layer). The shape metadata is informative: the tensors
// decide whether the layer fits, and their errors name the tensor.
template <CheckpointableLayer Layer>
void load_layer(const std::filesystem::path& path, Layer& layer) {
  detail::require_one_process(layer, "moe::io::load_layer");
  load_layer(detail::read_layer_file<Layer>(path), layer, "");
}

}  // namespace moe::io
