#pragma once
// The character language model of moe-train-lm:
//   h_0 = ContextEmbedding(c_{t-n..t-1})
//   h_{l+1} = h_l + MoE_l(RMSNorm_l(h_l)),   l = 0..L-1
//   p = softmax(W RMSNorm_f(h_L) + b),  loss = mean cross-entropy.
// Non-MoE parameters live in two flat buffers: "decay" (matrices, weight
// decay applies) and "no_decay" (gains and biases).

#include <algorithm>
#include <cmath>
#include <memory>
#include <moe/core/tensor_buffer.hpp>
#include <moe/math/random.hpp>
#include <string>
#include <vector>

#include "blocks.hpp"
#include "nn.hpp"

namespace train_lm {

struct ModelShape {
  int vocab = 0;
  int context = 12;  // n: characters the model sees
  int d_model = 128;
};

// A parameter buffer, its gradient, and whether AdamW decays it.
template <class T>
struct ParameterGroup {
  std::string name;
  moe::TensorBuffer<T>* params;
  moe::TensorBuffer<T>* grads;
  bool decay;
};

template <class T>
class Model {
 public:
  Model(ModelShape shape, std::vector<std::unique_ptr<Block<T>>> blocks, std::uint64_t seed)
      : shape_(shape), blocks_(std::move(blocks)) {
    moe::detail::require(shape.vocab >= 1, "moe-train-lm: vocabulary size ", shape.vocab,
                         ", expected >= 1");
    moe::detail::require(shape.context >= 1, "moe-train-lm: --context=", shape.context,
                         ", expected >= 1");
    moe::detail::require(shape.d_model >= 1, "moe-train-lm: --d-model=", shape.d_model,
                         ", expected >= 1");
    const moe::Index V = shape.vocab, n = shape.context, d = shape.d_model;
    auto decay = std::make_shared<moe::TensorLayout>();
    decay->add("embedding", {n, V, d});
    decay->add("head.weight", {V, d});
    auto no_decay = std::make_shared<moe::TensorLayout>();
    for (std::size_t l = 0; l < blocks_.size(); ++l) no_decay->add(norm_name(l), {d});
    no_decay->add("final_norm.gain", {d});
    no_decay->add("head.bias", {V});
    decay_ = moe::TensorBuffer<T>(std::move(decay));
    no_decay_ = moe::TensorBuffer<T>(std::move(no_decay));
    decay_grads_ = decay_.zeros_like();
    no_decay_grads_ = no_decay_.zeros_like();

    // Embedding rows N(0, 1/n): h_0 has unit-variance entries. Head N(0, 1/(4d)):
    // logits start near uniform. Gains 1, bias 0.
    fill_normal(decay_["embedding"], 1.0 / std::sqrt(static_cast<double>(n)), seed, 1);
    fill_normal(decay_["head.weight"], 0.5 / std::sqrt(static_cast<double>(d)), seed, 2);
    for (std::size_t l = 0; l <= blocks_.size(); ++l) {
      auto gain = no_decay_[l < blocks_.size() ? norm_name(l) : "final_norm.gain"];
      std::fill(gain.begin(), gain.end(), T(1));
    }
  }

  const ModelShape& shape() const { return shape_; }
  std::size_t layers() const { return blocks_.size(); }
  Block<T>& block(std::size_t l) { return *blocks_[l]; }
  const Block<T>& block(std::size_t l) const { return *blocks_[l]; }
  // Block l's input (RMSNorm of h_l) in the last forward, one row per token.
  const Matrix<T>& block_input(std::size_t l) const { return normed_[l]; }

  // Mean cross-entropy (nats) of the batch; keeps what backward needs.
  double forward(const Batch& batch, moe::Mode mode) {
    const Eigen::Index T_ = batch.rows(), d = shape_.d_model;
    resize(T_);
    ContextEmbedding<T>::forward(decay_["embedding"], shape_.vocab, batch, stream_[0]);
    std::span<const int> previous;
    for (std::size_t l = 0; l < blocks_.size(); ++l) {
      RMSNorm<T>::forward(stream_[l], no_decay_[norm_name(l)], normed_[l], inv_rms_[l]);
      blocks_[l]->forward(normed_[l], out_, mode, previous);
      stream_[l + 1] = stream_[l] + out_;
      previous = blocks_[l]->top1();
    }
    RMSNorm<T>::forward(stream_.back(), no_decay_["final_norm.gain"], normed_.back(),
                        inv_rms_.back());
    const Eigen::Map<const Matrix<T>> head(decay_["head.weight"].data(), shape_.vocab, d);
    return SoftmaxCrossEntropyHead<T>::forward(normed_.back(), head, no_decay_["head.bias"],
                                               batch.targets, probs_);
  }

  // The next-character distribution of the batch's first row (eval mode).
  std::span<const T> sample_probabilities(const Batch& batch) {
    forward(batch, moe::Mode::eval);
    return {probs_.data(), static_cast<std::size_t>(probs_.cols())};
  }

  // Gradients of the last forward's loss (plus the routers' aux terms)
  // accumulate into every group's grads. The loss is the mean over
  // `loss_tokens` tokens: the batch's own (0), or the whole batch's when
  // this is one process's share of it.
  void backward(const Batch& batch, Eigen::Index loss_tokens = 0) {
    const Eigen::Index d = shape_.d_model;
    const Eigen::Map<const Matrix<T>> head(decay_["head.weight"].data(), shape_.vocab, d);
    Eigen::Map<Matrix<T>> dhead(decay_grads_["head.weight"].data(), shape_.vocab, d);
    SoftmaxCrossEntropyHead<T>::backward(normed_.back(), head, batch.targets, probs_, dhead,
                                         no_decay_grads_["head.bias"], d_normed_,
                                         loss_tokens > 0 ? loss_tokens : batch.rows());
    RMSNorm<T>::backward(stream_.back(), no_decay_["final_norm.gain"], inv_rms_.back(), d_normed_,
                         d_stream_, no_decay_grads_["final_norm.gain"]);
    for (std::size_t l = blocks_.size(); l-- > 0;) {
      // d_stream_ is dL/dh_{l+1}: it flows to h_l directly and through the block.
      blocks_[l]->backward(normed_[l], d_stream_, d_normed_);
      RMSNorm<T>::backward(stream_[l], no_decay_[norm_name(l)], inv_rms_[l], d_normed_, d_branch_,
                           no_decay_grads_[norm_name(l)]);
      d_stream_ += d_branch_;
    }
    ContextEmbedding<T>::backward(decay_grads_["embedding"], shape_.vocab, batch, d_stream_);
  }

  std::vector<ParameterGroup<T>> groups() {
    std::vector<ParameterGroup<T>> g{{"decay", &decay_, &decay_grads_, true},
                                     {"no_decay", &no_decay_, &no_decay_grads_, false}};
    for (std::size_t l = 0; l < blocks_.size(); ++l)
      g.push_back({block_name(l), &blocks_[l]->parameters(), &blocks_[l]->gradients(), true});
    return g;
  }

  // Data-parallel gradients over the processes of `group`, each of which
  // ran backward on its share of the batch: afterwards every replicated
  // tensor holds the whole batch's gradient (the same bits everywhere), and
  // experts over the processes keep their own.
  void sum_gradients(const moe::ProcessGroup& group) {
    if (group.size() == 1) return;
    for (auto* grads : {&decay_grads_, &no_decay_grads_}) {
      std::vector<double> values(grads->flat().begin(), grads->flat().end());
      group.sum(values.data(), static_cast<moe::Index>(values.size()));
      std::copy(values.begin(), values.end(), grads->flat().begin());
    }
    for (auto& b : blocks_) b->sum_gradients(group);
  }

  // ||g||^2 over every parameter of the model, whichever process holds it.
  double squared_gradient_norm(const moe::ProcessGroup& group) {
    double replicated = 0, sharded = 0;
    for (auto* grads : {&decay_grads_, &no_decay_grads_})
      for (T v : grads->flat()) replicated += static_cast<double>(v) * static_cast<double>(v);
    for (auto& b : blocks_) b->add_squared_gradients(replicated, sharded);
    return replicated + group.sum(sharded);
  }

  void zero_grad() {
    for (auto& g : groups()) g.grads->set_zero();
  }

  void end_step(std::uint64_t steps_done) {
    for (auto& b : blocks_) b->end_step(steps_done);
  }

  // Every parameter, and the parameters one token uses: the non-MoE ones
  // except the embedding rows it does not look up, plus per block the router
  // and the experts it is routed to (`experts_per_token` measured).
  moe::Index total_parameters() {
    moe::Index n = decay_.size() + no_decay_.size();
    for (const auto& b : blocks_) n += b->total_parameters();
    return n;
  }
  double active_parameters(const std::vector<double>& experts_per_token) {
    const moe::Index d = shape_.d_model;
    double n = static_cast<double>(no_decay_.size() + decay_["head.weight"].size()) +
               static_cast<double>(shape_.context * d);
    for (std::size_t l = 0; l < blocks_.size(); ++l) {
      const auto& b = *blocks_[l];
      const double per_expert = static_cast<double>(b.parameters_per_expert());
      const double router = static_cast<double>(b.total_parameters()) - per_expert * b.experts();
      n += router + per_expert * experts_per_token[l];
    }
    return n;
  }

  static std::string norm_name(std::size_t l) { return "norm" + std::to_string(l) + ".gain"; }
  static std::string block_name(std::size_t l) { return "block" + std::to_string(l); }

 private:
  static void fill_normal(std::span<T> values, double std, std::uint64_t seed,
                          std::uint64_t stream) {
    for (std::size_t i = 0; i < values.size(); ++i)
      values[i] = static_cast<T>(std * moe::math::standard_normal(seed, stream, i));
  }

  void resize(Eigen::Index tokens) {
    const Eigen::Index d = shape_.d_model;
    const std::size_t L = blocks_.size();
    stream_.resize(L + 1);
    normed_.resize(L + 1);
    inv_rms_.resize(L + 1);
    for (auto& m : stream_) m.resize(tokens, d);
    for (auto& m : normed_) m.resize(tokens, d);
    out_.resize(tokens, d);
    d_normed_.resize(tokens, d);
    d_stream_.resize(tokens, d);
    d_branch_.resize(tokens, d);
  }

  ModelShape shape_;
  std::vector<std::unique_ptr<Block<T>>> blocks_;
  moe::TensorBuffer<T> decay_, no_decay_, decay_grads_, no_decay_grads_;

  // Activations of the last forward: the residual stream h_0..h_L, the normed
  // inputs of each block and of the head, their 1/rms, and the softmax.
  std::vector<Matrix<T>> stream_, normed_;
  std::vector<Vector<T>> inv_rms_;
  Matrix<T> out_, probs_, d_normed_, d_stream_, d_branch_;

 public:
  // For checkpoints and tests.
  moe::TensorBuffer<T>& decay_parameters() { return decay_; }
  moe::TensorBuffer<T>& no_decay_parameters() { return no_decay_; }
};

}  // namespace train_lm
