#pragma once
// One recipe's training run: batches, AdamW with a warm-up + cosine learning
// rate, global gradient-norm clipping, validation, metrics, and checkpoints
// from which a run resumes bitwise identically.

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <moe/io/checkpoint.hpp>
#include <moe/io/safetensors.hpp>
#include <moe/optim/adamw.hpp>
#include <numbers>
#include <span>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "model.hpp"
#include "recipes.hpp"
#include "text.hpp"

namespace train_lm {

struct TrainOptions {
  std::uint64_t steps = 3000;
  int batch = 256;  // tokens per step
  double lr = 3e-3;
  double min_lr_ratio = 0.1;  // the cosine ends at lr * min_lr_ratio
  std::uint64_t warmup = 100;
  double weight_decay = 0.1;
  double clip = 1.0;  // global gradient norm; 0: off
  std::uint64_t seed = 1;
  std::uint64_t eval_every = 250;
  std::uint64_t log_every = 50;
  std::size_t eval_chars = 32768;  // validation characters scored; 0: the whole split
};

// Warm-up from lr/warmup to lr, then cosine to lr * min_lr_ratio at the end.
inline double learning_rate(const TrainOptions& o, std::uint64_t step) {
  if (step < o.warmup) return o.lr * static_cast<double>(step + 1) / static_cast<double>(o.warmup);
  const double span = static_cast<double>(o.steps > o.warmup ? o.steps - o.warmup : 1);
  const double p = std::min(1.0, static_cast<double>(step - o.warmup) / span);
  const double cosine = 0.5 * (1 + std::cos(std::numbers::pi * p));
  return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * cosine);
}

struct MetricsRow {
  std::string recipe;
  std::uint64_t step = 0, tokens = 0;
  double train_loss = NAN, val_loss = NAN, sparsity = NAN, lambda = NAN;
  int k = -1;
  double max_load_over_mean = NAN, tokens_per_s = NAN;
  std::uint64_t seed = 0;
};

// Routing statistics of a window of training steps, averaged over the blocks.
struct RoutingSummary {
  double sparsity = NAN;                  // zero-gate fraction
  double max_load_over_mean = NAN;        // max_e n_e / mean_e n_e, n_e summed over the window
  std::vector<double> experts_per_token;  // per block
};

// Sums each block's routing counts over the steps of a logging window: one
// batch of 64 pairs per expert is too few for a load statistic.
class RoutingWindow {
 public:
  template <class T>
  void add(Model<T>& model, Eigen::Index tokens) {
    const auto L = model.layers();
    load_.resize(L);
    selected_.resize(L, 0.0);
    zero_fraction_.resize(L, 0.0);
    for (std::size_t l = 0; l < L; ++l) {
      const auto& st = model.block(l).stats();
      load_[l].resize(st.tokens_per_expert.size(), 0.0);
      for (std::size_t e = 0; e < st.tokens_per_expert.size(); ++e)
        load_[l][e] += static_cast<double>(st.tokens_per_expert[e]);
      selected_[l] += static_cast<double>(st.selected_pairs);
      zero_fraction_[l] += st.zero_gate_fraction;
    }
    tokens_ += static_cast<double>(tokens);
    steps_ += 1;
  }

  // The window's summary over the whole batches of `group`'s processes;
  // starts a new window.
  RoutingSummary take(const moe::ProcessGroup& group) {
    RoutingSummary s;
    if (steps_ == 0) return s;
    if (group.size() > 1) {
      for (auto& load : load_) group.sum(load.data(), static_cast<moe::Index>(load.size()));
      group.sum(selected_.data(), static_cast<moe::Index>(selected_.size()));
      // Each process's fraction weighted by its tokens (the same every step).
      const double total = group.sum(tokens_);
      for (double& z : zero_fraction_) z *= tokens_ / total;
      group.sum(zero_fraction_.data(), static_cast<moe::Index>(zero_fraction_.size()));
      tokens_ = total;
    }
    const auto L = static_cast<double>(load_.size());
    s.sparsity = 0;
    s.max_load_over_mean = 0;
    for (std::size_t l = 0; l < load_.size(); ++l) {
      double max = 0, sum = 0;
      for (double n : load_[l]) max = std::max(max, n), sum += n;
      const double mean = sum / static_cast<double>(load_[l].size());
      s.max_load_over_mean += (mean > 0 ? max / mean : 0) / L;
      s.sparsity += zero_fraction_[l] / steps_ / L;
      s.experts_per_token.push_back(selected_[l] / tokens_);
    }
    *this = RoutingWindow();
    return s;
  }

 private:
  std::vector<std::vector<double>> load_;
  std::vector<double> selected_, zero_fraction_;
  double tokens_ = 0;
  int steps_ = 0;
};

// The share of the inputs' variance left within the experts, each token at
// its top-1 expert:
//   sum_e sum_{t -> e} |x_t - mean_e|^2 / sum_t |x_t - mean|^2,
// 1 for a routing blind to x, lower for tighter per-expert clusters (ACMoE's
// claim). Accumulated over batches, summed over processes. A plain
// Euclidean measure of the block's input by the block's own top-1 choice:
// ACMoE's router weighs features by its own metric, and top-2 routing sends
// each token to a second expert this leaves out; a collapsed routing (every
// token at one expert) scores 1.
class ExpertDispersion {
 public:
  ExpertDispersion(int experts, int d)
      : experts_(static_cast<std::size_t>(experts)),
        d_(static_cast<std::size_t>(d)),
        sums_((experts_ + 1) * (d_ + 2), 0.0) {}

  // Tokens routed to no expert (top1 -1: a ReLU router's) are left out.
  template <class Rows>
  void add(const Rows& x, std::span<const int> top1) {
    moe::detail::require(top1.size() == static_cast<std::size_t>(x.rows()),
                         "ExpertDispersion::add: top1 has ", top1.size(), " tokens, expected ",
                         x.rows());
    for (Eigen::Index t = 0; t < x.rows(); ++t) {
      const int expert = top1[static_cast<std::size_t>(t)];
      if (expert < 0) continue;
      moe::detail::require(static_cast<std::size_t>(expert) < experts_,
                           "ExpertDispersion::add: top1[", t, "]=", expert, ", expected < ",
                           experts_);
      for (const std::size_t group :
           {static_cast<std::size_t>(expert), experts_}) {  // its expert's sums, and all tokens'
        double* s = &sums_[group * (d_ + 2)];               // count, sum |x|^2, sum x
        s[0] += 1;
        for (std::size_t j = 0; j < d_; ++j) {
          const auto v = static_cast<double>(x(t, static_cast<Eigen::Index>(j)));
          s[1] += v * v;
          s[2 + j] += v;
        }
      }
    }
  }

  // The share over every process's tokens (a collective: every process calls it).
  double within_share(const moe::ProcessGroup& group) const {
    if (experts_ < 2) return std::numeric_limits<double>::quiet_NaN();
    std::vector<double> all = sums_;
    group.sum(all.data(), static_cast<moe::Index>(all.size()));
    double within = 0;
    for (std::size_t e = 0; e < experts_; ++e) within += scatter(all, e);
    return within / scatter(all, experts_);
  }

 private:
  // sum |x - mean|^2 over a group's tokens from its sums: [count, sum |x|^2, sum x (d)].
  double scatter(const std::vector<double>& sums, std::size_t group) const {
    const double* s = &sums[group * (d_ + 2)];
    if (s[0] == 0) return 0.0;
    double mean_sq = 0;
    for (std::size_t j = 0; j < d_; ++j) mean_sq += s[2 + j] * s[2 + j];
    return s[1] - mean_sq / s[0];
  }

  std::size_t experts_, d_;
  std::vector<double> sums_;
};

class Run {
 public:
  using T = float;

  // `dispatcher` places the MoE blocks' experts: dispatch::Local (all in
  // this process), or experts over processes (mpi::ExpertParallel; it must
  // outlive the run), where each process trains on its share of every batch
  // and the results are the single process's.
  template <class Dispatcher = moe::dispatch::Local>
  Run(std::string recipe, const Corpus& corpus, ModelShape shape, RecipeOptions recipe_options,
      TrainOptions options, const Dispatcher& dispatcher = {})
      : recipe_(std::move(recipe)),
        corpus_(corpus),
        recipe_options_(prepare(recipe_options, options)),
        options_(options),
        model_(shape, make_blocks<T>(recipe_, recipe_options_, options.seed, nullptr, dispatcher),
               options.seed),
        group_(&dispatcher.group()) {
    moe::detail::require(options.batch >= group_->size(), "moe-train-lm: --batch=", options.batch,
                         ", expected >= ", group_->size(), " (a token for each process)");
    moe::detail::require(options.steps >= 1, "moe-train-lm: --steps=", options.steps,
                         ", expected >= 1");
    for (auto& g : model_.groups())
      optimizers_.emplace_back(moe::optim::AdamWOptions{
          .lr = options.lr, .weight_decay = g.decay ? options.weight_decay : 0.0});
    batch_.context = shape.context;
    positions_.resize(static_cast<std::size_t>(options.batch));
  }

  const std::string& recipe() const { return recipe_; }
  std::uint64_t step() const { return step_; }
  bool done() const { return step_ >= options_.steps; }
  Model<T>& model() { return model_; }
  const TrainOptions& options() const { return options_; }

  // One optimiser step; returns the batch's training loss.
  double train_step() {
    sample_positions(options_.seed, step_, batch_.context, corpus_.train.size(), positions_);
    fill_batch(corpus_.train, share(positions_), batch_);
    model_.zero_grad();
    const double loss =
        whole_batch_mean(model_.forward(batch_, moe::Mode::train), batch_.rows(), options_.batch);
    routing_window_.add(model_, batch_.rows());
    model_.backward(batch_, options_.batch);
    model_.sum_gradients(*group_);
    clip_gradients();
    const double lr = learning_rate(options_, step_);
    auto groups = model_.groups();
    for (std::size_t i = 0; i < groups.size(); ++i) {
      optimizers_[i].options().lr = lr;
      optimizers_[i].step(*groups[i].params, *groups[i].grads);
    }
    ++step_;
    model_.end_step(step_);
    return loss;
  }

  // Routing statistics of the training steps since the last call.
  RoutingSummary take_routing_window() {
    last_routing_window_ = routing_window_.take(*group_);
    return last_routing_window_;
  }
  const RoutingSummary& last_routing_window() const { return last_routing_window_; }

  // Mean cross-entropy (nats per character) over the first eval_chars
  // predictions of the validation split (all of it when 0): the same
  // characters at every evaluation and for every recipe.
  double evaluate() {
    double sum = 0;
    std::size_t count = 0;
    for_each_validation_chunk([&](const Batch& b, std::size_t whole_chunk) {
      sum += model_.forward(b, moe::Mode::eval) * static_cast<double>(b.rows());
      count += whole_chunk;
    });
    return group_->sum(sum) / static_cast<double>(count);
  }

  // How tightly the last block's experts' inputs cluster, over the
  // characters evaluate() scores (ExpertDispersion). NaN with one expert.
  double expert_dispersion() {
    auto& block = model_.block(model_.layers() - 1);
    ExpertDispersion dispersion(block.experts(), model_.shape().d_model);
    for_each_validation_chunk([&](const Batch& b, std::size_t) {
      model_.forward(b, moe::Mode::eval);
      dispersion.add(model_.block_input(model_.layers() - 1), block.top1());
    });
    return dispersion.within_share(*group_);
  }

  // Eval forwards at k experts (SMoE-Dropout's self-slimming); 0 clears.
  void set_inference_k(int k) {
    for (std::size_t l = 0; l < model_.layers(); ++l) model_.block(l).set_inference_k(k);
  }

  // Everything a bitwise-identical resume needs: parameters, layer state
  // (EMA, lambda, schedule step, dropout counter), AdamW moments and steps,
  // the step; the configuration as metadata, checked on load.
  void save(const std::filesystem::path& path) const {
    require_one_process("checkpoints");
    moe::io::SafetensorsWriter w;
    for (const auto& [key, value] : identity()) w.set_metadata(key, value);
    w.set_metadata("step", std::to_string(step_));
    auto& model = const_cast<Model<T>&>(model_);  // groups() hands out mutable pointers
    auto groups = model.groups();
    for (std::size_t i = 0; i < groups.size(); ++i) {
      const std::string prefix = "optim." + groups[i].name + ".";
      const auto& opt = optimizers_[i];
      const std::uint64_t steps = opt.steps();
      w.add<std::uint64_t>(prefix + "steps", std::span<const std::uint64_t>(&steps, 1), {1});
      const auto size = static_cast<std::int64_t>(opt.first_moment().size());
      w.add<double>(prefix + "m", opt.first_moment(), {size});
      w.add<double>(prefix + "v", opt.second_moment(), {size});
    }
    moe::io::add_buffer(w, "model.", model.decay_parameters());
    moe::io::add_buffer(w, "model.", model.no_decay_parameters());
    for (std::size_t l = 0; l < model.layers(); ++l)
      model.block(l).save(w, Model<T>::block_name(l) + ".");
    const std::uint64_t step = step_;
    w.add<std::uint64_t>("train.step", std::span<const std::uint64_t>(&step, 1), {1});
    w.write(path);
  }

  void load(const std::filesystem::path& path) {
    require_one_process("--resume");
    const auto file = moe::io::Safetensors::read(path);
    for (const auto& [key, value] : identity()) {
      const auto it = file.metadata().find(key);
      const std::string found = it == file.metadata().end() ? "(missing)" : it->second;
      moe::detail::require(found == value, "moe-train-lm: --resume ", path.string(), ": ", key, "=",
                           found, ", expected ", value, " (the run's own settings)");
    }
    const std::int64_t one[] = {1};
    const auto step = file.get<std::uint64_t>("train.step", one)[0];
    moe::detail::require(step <= options_.steps, "moe-train-lm: --resume ", path.string(),
                         ": step ", step, " is past --steps=", options_.steps);
    // Each piece is checked before it is loaded, but the pieces load one after
    // another: on an error the run is half-loaded, and the program stops.
    auto groups = model_.groups();
    for (std::size_t i = 0; i < groups.size(); ++i) {
      const std::string prefix = "optim." + groups[i].name + ".";
      const auto steps = file.get<std::uint64_t>(prefix + "steps", one)[0];
      const auto& info = file.info(prefix + "m");
      const std::int64_t size[] = {info.shape.empty() ? 0 : info.shape[0]};
      const auto m = file.get<double>(prefix + "m", size);
      const auto v = file.get<double>(prefix + "v", size);
      optimizers_[i].restore(steps, m, v);
    }
    moe::io::load_buffer(file, "model.", model_.decay_parameters());
    moe::io::load_buffer(file, "model.", model_.no_decay_parameters());
    for (std::size_t l = 0; l < model_.layers(); ++l)
      model_.block(l).load(file, Model<T>::block_name(l) + ".");
    step_ = step;
  }

 private:
  static RecipeOptions prepare(RecipeOptions r, const TrainOptions& o) {
    r.total_steps = o.steps;
    return r;
  }

  // What must match between a checkpoint and the run resuming it.
  std::vector<std::pair<std::string, std::string>> identity() const {
    std::string alphabet;
    for (char32_t cp : corpus_.alphabet) alphabet += encode_utf8(cp);
    const auto& s = model_.shape();
    const auto& r = recipe_options_;
    const auto& o = options_;
    auto str = [](auto v) {
      std::ostringstream os;
      os.precision(17);
      os << v;
      return os.str();
    };
    return {{"format", "moe-train-lm"},
            {"recipe", recipe_},
            {"alphabet", alphabet},
            {"context", str(s.context)},
            {"d_model", str(s.d_model)},
            {"d_ff", str(r.d_ff)},
            {"experts", str(r.experts)},
            {"k", str(r.k)},
            {"layers", str(r.layers)},
            {"aux_coef", str(r.aux_coef)},
            {"ema_beta", str(r.ema_beta)},
            {"smoe_k_min", str(r.smoe_k_min)},
            {"steps", str(o.steps)},
            {"batch", str(o.batch)},
            {"lr", str(o.lr)},
            {"min_lr_ratio", str(o.min_lr_ratio)},
            {"warmup", str(o.warmup)},
            {"weight_decay", str(o.weight_decay)},
            {"clip", str(o.clip)},
            {"seed", str(o.seed)},
            {"valid_fraction", str(corpus_.valid_fraction)},
            {"data_fingerprint", str(corpus_.fingerprint)}};
  }

  // Calls f(batch, rows of the whole chunk) on this process's share of each
  // chunk of the characters evaluate() scores.
  template <class F>
  void for_each_validation_chunk(F&& f, std::size_t chunk = 2048) {
    const auto& valid = corpus_.valid;
    const std::size_t n_scored =
        options_.eval_chars == 0
            ? valid.size()
            : std::min(valid.size(),
                       options_.eval_chars + static_cast<std::size_t>(batch_.context));
    const auto n = static_cast<std::size_t>(batch_.context);
    Batch b;
    b.context = batch_.context;
    std::vector<std::size_t> pos;
    const auto processes = static_cast<std::size_t>(group_->size());
    for (std::size_t start = n; start < n_scored;) {
      // A chunk, with the rest when fewer than one token per process would remain.
      std::size_t end = std::min(n_scored, start + chunk);
      if (n_scored - end < processes) end = n_scored;
      pos.clear();
      for (std::size_t t = start; t < end; ++t) pos.push_back(t);
      fill_batch(valid, share(pos), b);
      f(std::as_const(b), pos.size());
      start = end;
    }
  }

  static void fill_batch(const std::vector<int>& text, const std::vector<std::size_t>& positions,
                         Batch& b) {
    const auto n = static_cast<std::size_t>(b.context);
    b.targets.resize(positions.size());
    b.history.resize(positions.size() * n);
    for (std::size_t r = 0; r < positions.size(); ++r) {
      const std::size_t t = positions[r];
      b.targets[r] = text[t];
      for (std::size_t j = 0; j < n; ++j) b.history[r * n + j] = text[t - 1 - j];
    }
  }

  // This process's share of a batch's positions: the batch is the
  // processes' shares in rank order, as one process would see it whole.
  std::vector<std::size_t> share(const std::vector<std::size_t>& all) const {
    if (group_->size() == 1) return all;
    const std::size_t n = all.size(), P = static_cast<std::size_t>(group_->size()),
                      r = static_cast<std::size_t>(group_->rank());
    return {all.begin() + static_cast<std::ptrdiff_t>(n * r / P),
            all.begin() + static_cast<std::ptrdiff_t>(n * (r + 1) / P)};
  }

  // The whole batch's mean from this process's mean over its `rows`.
  double whole_batch_mean(double mine, Eigen::Index rows, Eigen::Index total) const {
    if (group_->size() == 1) return mine;
    return group_->sum(mine * static_cast<double>(rows)) / static_cast<double>(total);
  }

  void require_one_process(const char* what) const {
    moe::detail::require(group_->size() == 1, "moe-train-lm: ", what, " with ", group_->size(),
                         " processes (--expert-parallel), expected one: checkpoints of a run "
                         "over processes are not supported yet");
  }

  // Scales every gradient by min(1, clip / ||g||) over all parameters (on
  // every process, whichever holds them).
  void clip_gradients() {
    const double norm = std::sqrt(model_.squared_gradient_norm(*group_));
    if (options_.clip <= 0 || norm <= options_.clip) return;
    const auto scale = static_cast<T>(options_.clip / norm);
    for (auto& g : model_.groups())
      for (T& v : g.grads->flat()) v *= scale;
  }

  std::string recipe_;
  const Corpus& corpus_;
  RecipeOptions recipe_options_;
  TrainOptions options_;
  Model<T> model_;
  const moe::ProcessGroup* group_;  // the processes sharing each batch
  std::vector<moe::optim::AdamW> optimizers_;
  Batch batch_;
  std::vector<std::size_t> positions_;
  RoutingWindow routing_window_;
  RoutingSummary last_routing_window_;
  std::uint64_t step_ = 0;
};

}  // namespace train_lm
