#pragma once
// One MoE block of the model behind a small virtual interface, so that the
// model's stack can hold layers of different recipes (ACMoE: TopK first,
// AdaptiveCluster after). Each block is a moe::Layer used exactly as a user
// would: public headers, forward with a cache, backward into its gradients.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <moe/io/checkpoint.hpp>
#include <moe/moe.hpp>
#include <span>
#include <string>
#include <vector>

namespace train_lm {

template <class T>
class Block {
 public:
  virtual ~Block() = default;

  // y = MoE(x) for one micro-batch; `previous` is the previous block's top-1
  // assignment (ACMoE) or empty.
  virtual void forward(const moe::ConstMatrixView<T>& x, moe::MatrixView<T> y, moe::Mode mode,
                       std::span<const int> previous) = 0;
  // dx = dL/dx (overwritten); the block's parameter gradients accumulate.
  virtual void backward(const moe::ConstMatrixView<T>& x, const moe::ConstMatrixView<T>& dy,
                        moe::MatrixView<T> dx) = 0;

  virtual moe::TensorBuffer<T>& parameters() = 0;
  virtual moe::TensorBuffer<T>& gradients() = 0;
  virtual std::span<const int> top1() const = 0;
  virtual const moe::RoutingStats& stats() const = 0;
  virtual void end_step(std::uint64_t steps_done) = 0;

  virtual int experts() const = 0;
  virtual moe::Index parameters_per_expert() const = 0;
  // Every parameter of the block: the router's and all E experts', also
  // when this process holds only its share of the experts.
  virtual moe::Index total_parameters() const = 0;
  // The k of the next training forward (-1: a ReLU router has none).
  virtual int k() const = 0;
  // Eval forwards at another k (SMoE-Dropout's self-slimming); 0 clears.
  virtual void set_inference_k(int /*k*/) {
    throw moe::Error("moe-train-lm: this recipe's router has no inference k");
  }
  virtual double lambda() const { return std::numeric_limits<double>::quiet_NaN(); }

  // Data-parallel gradients over `group` (the processes of the run): a
  // block with experts over the processes sums its replicated tensors (the
  // router's; the experts' stay where they live), a block held whole by
  // every process sums everything. One process: nothing changes.
  virtual void sum_gradients(const moe::ProcessGroup& group) = 0;
  // The squares of its gradients: those held alike by every process, and
  // those of its experts when each process holds only its own.
  virtual void add_squared_gradients(double& replicated, double& sharded) const = 0;

  virtual void save(moe::io::SafetensorsWriter& writer, const std::string& prefix) const = 0;
  virtual void load(const moe::io::Safetensors& file, const std::string& prefix) = 0;
};

template <class Layer>
class LayerBlock final : public Block<typename Layer::Scalar> {
 public:
  using T = typename Layer::Scalar;

  explicit LayerBlock(Layer layer) : layer_(std::move(layer)), grads_(layer_.make_gradients()) {}

  void forward(const moe::ConstMatrixView<T>& x, moe::MatrixView<T> y, moe::Mode mode,
               std::span<const int> previous) override {
    layer_.forward(x, y, cache_, mode, {.previous_assignment = previous});
  }
  void backward(const moe::ConstMatrixView<T>& x, const moe::ConstMatrixView<T>& dy,
                moe::MatrixView<T> dx) override {
    layer_.backward(x, cache_, dy, dx, grads_);
  }

  moe::TensorBuffer<T>& parameters() override { return layer_.parameters(); }
  moe::TensorBuffer<T>& gradients() override { return grads_; }
  std::span<const int> top1() const override { return cache_.top1_assignment(); }
  const moe::RoutingStats& stats() const override { return cache_.stats(); }
  void end_step(std::uint64_t steps_done) override { layer_.end_step(steps_done); }

  int experts() const override { return layer_.config().experts; }
  moe::Index parameters_per_expert() const override {
    moe::Index n = 0;
    for (const auto& spec : layer_.parameters().layout().specs())
      if (spec.name.starts_with("experts.")) n += spec.size();
    return n / layer_.local_experts().count;
  }
  moe::Index total_parameters() const override {
    const moe::Index local = layer_.local_experts().count;
    return layer_.parameters().size() + (experts() - local) * parameters_per_expert();
  }
  int k() const override {
    if constexpr (requires { layer_.router().controller; }) {
      return -1;  // ReLU routing: k is only the sparsity target
    } else if constexpr (requires { layer_.router().k(); }) {
      return layer_.router().k();
    } else if constexpr (requires { layer_.router().k; }) {
      return layer_.router().k;
    } else {
      return -1;
    }
  }
  void set_inference_k(int k) override {
    if constexpr (requires { layer_.router().set_k(k); }) {
      layer_.router().set_k(k);
    } else {
      Block<T>::set_inference_k(k);
    }
  }
  double lambda() const override {
    if constexpr (requires { layer_.router().controller->lambda(); }) {
      return layer_.router().controller->lambda();
    } else {
      return Block<T>::lambda();
    }
  }

  void sum_gradients(const moe::ProcessGroup& group) override {
    if (sharded()) {
      moe::sum_replicated_gradients(layer_, grads_);
    } else if (group.size() > 1) {
      std::vector<double> values(grads_.flat().begin(), grads_.flat().end());
      group.sum(values.data(), static_cast<moe::Index>(values.size()));
      std::copy(values.begin(), values.end(), grads_.flat().begin());
    }
  }
  void add_squared_gradients(double& replicated, double& sharded_sum) const override {
    for (const auto& spec : grads_.layout().specs()) {
      double sum = 0;
      for (T v : grads_[spec.name]) sum += static_cast<double>(v) * static_cast<double>(v);
      (sharded() && Layer::is_expert_tensor(spec.name) ? sharded_sum : replicated) += sum;
    }
  }

  void save(moe::io::SafetensorsWriter& writer, const std::string& prefix) const override {
    moe::io::add_layer(writer, layer_, prefix);
  }
  void load(const moe::io::Safetensors& file, const std::string& prefix) override {
    moe::io::load_layer(file, layer_, prefix);
  }

 private:
  // Whether each process holds only its share of the experts.
  bool sharded() const { return layer_.dispatcher().group().size() > 1; }

  Layer layer_;
  typename Layer::Cache cache_;
  typename Layer::Parameters grads_;
};

template <class Layer>
std::unique_ptr<Block<typename Layer::Scalar>> make_block(Layer layer) {
  return std::make_unique<LayerBlock<Layer>>(std::move(layer));
}

}  // namespace train_lm
