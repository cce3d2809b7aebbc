// The non-MoE pieces of examples/train_lm (embedding, RMSNorm, softmax head),
// and the whole model with its MoE blocks, against central finite
// differences in double; the data helpers against known answers.

#include <doctest/doctest.h>

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "../examples/train_lm/model.hpp"
#include "../examples/train_lm/recipes.hpp"
#include "../examples/train_lm/seed_report.hpp"
#include "../examples/train_lm/statistics.hpp"
#include "../examples/train_lm/text.hpp"
#include "../examples/train_lm/train.hpp"

using namespace train_lm;
using M = Matrix<double>;

namespace {

M random(Eigen::Index rows, Eigen::Index cols, std::uint64_t seed) {
  M m(rows, cols);
  for (Eigen::Index i = 0; i < m.size(); ++i)
    m.data()[i] = 2 * moe::math::uniform01(seed, 11, static_cast<std::uint64_t>(i)) - 1;
  return m;
}

// Relative error of an analytic gradient against central differences of f
// over every entry of `values` (perturbed in place and restored).
double fd_error(std::span<double> values, const std::vector<double>& analytic,
                const std::function<double()>& f, double h = 1e-6) {
  double diff = 0, norm = 0;
  for (std::size_t i = 0; i < values.size(); ++i) {
    const double saved = values[i];
    values[i] = saved + h;
    const double up = f();
    values[i] = saved - h;
    const double down = f();
    values[i] = saved;
    const double numeric = (up - down) / (2 * h);
    diff += (numeric - analytic[i]) * (numeric - analytic[i]);
    norm += std::max(numeric * numeric, analytic[i] * analytic[i]);
  }
  return norm > 0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

Batch make_batch(int context, int vocab, int rows, std::uint64_t seed) {
  Batch b;
  b.context = context;
  for (int t = 0; t < rows; ++t) {
    b.targets.push_back(static_cast<int>(moe::math::hash3(seed, 1, t) % vocab));
    for (int j = 0; j < context; ++j)
      b.history.push_back(static_cast<int>(moe::math::hash3(seed, 2, t * context + j) % vocab));
  }
  b.history[0] = b.history[1];  // a character seen twice in one window
  return b;
}

}  // namespace

TEST_CASE("train_lm: context embedding backward is the scatter of dx") {
  const int vocab = 5, context = 3, d = 4;
  const Batch batch = make_batch(context, vocab, 6, 1);
  std::vector<double> table(static_cast<std::size_t>(context * vocab * d));
  for (std::size_t i = 0; i < table.size(); ++i) table[i] = std::sin(1.0 + static_cast<double>(i));
  const M r = random(batch.rows(), d, 2);
  M x(batch.rows(), d);
  auto loss = [&] {
    ContextEmbedding<double>::forward(table, vocab, batch, x);
    return (x.array() * r.array()).sum();
  };
  std::vector<double> grad(table.size(), 0.0);
  ContextEmbedding<double>::backward(grad, vocab, batch, r);
  CHECK(fd_error(table, grad, loss) < 1e-8);
  // Known answer: row 0 sums the three tables' rows of its history.
  ContextEmbedding<double>::forward(table, vocab, batch, x);
  double expected = 0;
  for (int j = 0; j < context; ++j)
    expected += table[static_cast<std::size_t>((j * vocab + batch.history[j]) * d)];
  CHECK(x(0, 0) == doctest::Approx(expected).epsilon(1e-15));
}

TEST_CASE("train_lm: RMSNorm backward (dx and gain) matches finite differences") {
  for (const Eigen::Index d : {1, 3, 16}) {
    CAPTURE(d);
    M x = random(5, d, 3);
    x.row(1) *= 1e-2;  // a small-norm row: the eps term matters
    std::vector<double> gain(static_cast<std::size_t>(d));
    for (std::size_t q = 0; q < gain.size(); ++q) gain[q] = 0.5 + 0.1 * static_cast<double>(q);
    const M r = random(5, d, 4);
    M y(5, d), dx(5, d);
    Vector<double> inv_rms;
    auto loss = [&] {
      RMSNorm<double>::forward(x, gain, y, inv_rms);
      return (y.array() * r.array()).sum();
    };
    loss();
    std::vector<double> dgain(gain.size(), 0.0);
    RMSNorm<double>::backward(x, gain, inv_rms, r, dx, dgain);
    std::vector<double> dx_flat(dx.data(), dx.data() + dx.size());
    CHECK(fd_error({x.data(), static_cast<std::size_t>(x.size())}, dx_flat, loss) < 1e-7);
    CHECK(fd_error(gain, dgain, loss) < 1e-7);
    // Known answer: unit gains give rows of mean square ~1.
    std::fill(gain.begin(), gain.end(), 1.0);
    loss();
    CHECK(y.row(0).squaredNorm() / static_cast<double>(d) == doctest::Approx(1.0).epsilon(1e-5));
  }
}

TEST_CASE("train_lm: softmax cross-entropy head backward matches finite differences") {
  const int vocab = 7, d = 5;
  const Batch batch = make_batch(1, vocab, 9, 5);
  M h = random(batch.rows(), d, 6);
  std::vector<double> weight(static_cast<std::size_t>(vocab * d)), bias(vocab);
  for (std::size_t i = 0; i < weight.size(); ++i) weight[i] = std::cos(static_cast<double>(i));
  for (std::size_t i = 0; i < bias.size(); ++i) bias[i] = 0.1 * static_cast<double>(i);
  M probs;
  auto loss = [&] {
    const Eigen::Map<const M> w(weight.data(), vocab, d);
    return SoftmaxCrossEntropyHead<double>::forward(h, w, bias, batch.targets, probs);
  };
  loss();
  std::vector<double> dweight(weight.size(), 0.0), dbias(bias.size(), 0.0);
  M dh(h.rows(), d);
  const Eigen::Map<const M> w(weight.data(), vocab, d);
  SoftmaxCrossEntropyHead<double>::backward(
      h, w, batch.targets, probs, Eigen::Map<M>(dweight.data(), vocab, d), dbias, dh, h.rows());
  std::vector<double> dh_flat(dh.data(), dh.data() + dh.size());
  CHECK(fd_error(weight, dweight, loss) < 1e-7);
  CHECK(fd_error(bias, dbias, loss) < 1e-7);
  CHECK(fd_error({h.data(), static_cast<std::size_t>(h.size())}, dh_flat, loss) < 1e-7);
  // Known answer: zero weights and bias give the uniform distribution, loss ln V.
  std::fill(weight.begin(), weight.end(), 0.0);
  std::fill(bias.begin(), bias.end(), 0.0);
  CHECK(loss() == doctest::Approx(std::log(vocab)).epsilon(1e-14));
}

// The whole model, MoE blocks included: every parameter of every group,
// L = cross-entropy + the routers' aux terms, in training mode.
TEST_CASE("train_lm: the whole model's backward matches finite differences, per recipe") {
  const ModelShape shape{.vocab = 6, .context = 3, .d_model = 4};
  const RecipeOptions options{
      .d_model = 4, .d_ff = 3, .experts = 4, .k = 2, .layers = 2, .total_steps = 10};
  const Batch batch = make_batch(shape.context, shape.vocab, 7, 9);
  // ACMoE's cluster weights take no gradient (docs/algorithms.md 3.3) and DefaultEMA
  // updates its state in every training forward: the layer tests check those.
  for (const std::string recipe : {"dense", "topk", "remoe", "smoe-dropout", "smoe-learned"}) {
    CAPTURE(recipe);
    Model<double> model(shape, make_blocks<double>(recipe, options, 3), 3);
    auto loss = [&] {
      double aux = 0;
      const double ce = model.forward(batch, moe::Mode::train);
      for (std::size_t l = 0; l < model.layers(); ++l) aux += model.block(l).stats().aux_loss;
      return ce + aux;
    };
    model.zero_grad();
    loss();
    model.backward(batch);
    for (auto& group : model.groups()) {
      CAPTURE(group.name);
      std::vector<double> analytic(group.grads->flat().begin(), group.grads->flat().end());
      // Frozen tensors (SMoE-Dropout's router) must have a zero gradient.
      for (const auto& spec : group.params->layout().specs())
        if (!spec.trainable)
          for (double g : (*group.grads)[spec.name]) CHECK(g == 0.0);
      for (const auto& spec : group.params->layout().specs()) {
        if (!spec.trainable) continue;
        CAPTURE(spec.name);
        const std::vector<double> a(analytic.begin() + spec.offset,
                                    analytic.begin() + spec.offset + spec.size());
        CHECK(fd_error((*group.params)[spec.name], a, loss) < 1e-6);
      }
    }
  }
}

TEST_CASE("train_lm: UTF-8 decoding, the split and the batches") {
  CHECK(decode_utf8("a\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80", "s") ==
        std::vector<char32_t>{U'a', U'\u00e9', U'\u20ac', U'\U0001F600'});
  CHECK_THROWS_WITH_AS(
      decode_utf8("ab\xC3", "f.txt"),
      doctest::Contains("f.txt: invalid UTF-8 (truncated sequence) at byte offset 2"), moe::Error);
  CHECK_THROWS_AS(decode_utf8("\xC0\xAF", "s"), moe::Error);      // overlong
  CHECK_THROWS_AS(decode_utf8("\xED\xA0\x80", "s"), moe::Error);  // a surrogate
  CHECK_THROWS_AS(decode_utf8("\x80", "s"), moe::Error);
  for (char32_t cp : {U'x', U'\u00e9', U'\u20ac', U'\U0001F600'})
    CHECK(decode_utf8(encode_utf8(cp), "s") == std::vector<char32_t>{cp});

  const Corpus c =
      make_corpus("abcabcabcabcabcabcabcabcabcabcabcabcabcabcabcabcabcabcab\xC3\xA9", "s", 0.25, 3);
  CHECK(c.vocab_size() == 4);
  CHECK(c.alphabet.back() == U'\u00e9');
  CHECK(c.valid.size() == 14);  // floor(57 * 0.25)
  CHECK(c.train.size() + c.valid.size() == 57);
  CHECK(c.valid.back() == 3);
  CHECK_THROWS_WITH_AS(make_corpus("abcdef", "tiny", 0.5, 3), doctest::Contains("too few"),
                       moe::Error);

  std::vector<std::size_t> a(64), b(64);
  sample_positions(7, 3, 3, 100, a);
  sample_positions(7, 3, 3, 100, b);
  CHECK(a == b);
  for (auto p : a) CHECK((p >= 3 && p < 100));
  sample_positions(7, 4, 3, 100, b);
  CHECK(a != b);
}

TEST_CASE("train_lm: learning rate warms up, then follows the cosine to the floor") {
  const TrainOptions o{.steps = 110, .lr = 1.0, .min_lr_ratio = 0.1, .warmup = 10};
  CHECK(learning_rate(o, 0) == doctest::Approx(0.1));
  CHECK(learning_rate(o, 9) == doctest::Approx(1.0));
  CHECK(learning_rate(o, 10) == doctest::Approx(1.0));
  CHECK(learning_rate(o, 60) == doctest::Approx(0.55));
  CHECK(learning_rate(o, 110) == doctest::Approx(0.1));
}

TEST_CASE("train_lm: seed statistics: means, Student t intervals, paired differences") {
  CHECK(student_t_975(1) == 12.706);
  CHECK(student_t_975(2) == 4.303);
  CHECK(student_t_975(30) == 2.042);
  CHECK(student_t_975(60) == doctest::Approx(2.000).epsilon(1e-3));
  // {1, 2, 3}: mean 2, standard deviation 1, half-width t(2) / sqrt(3).
  const Interval i = mean_interval({1.0, 2.0, 3.0});
  CHECK(i.n == 3);
  CHECK(i.mean == 2.0);
  CHECK(i.half == doctest::Approx(4.303 / std::sqrt(3.0)));
  // 2 - 2.48 < 0 < 2 + 2.48: the interval holds 0, and lies below 5.
  CHECK(!i.below(0.0));
  CHECK(!i.above(0.0));
  CHECK(i.below(5.0));
  CHECK(i.above(-1.0));
  // Non-finite values are left out; one value has no interval.
  const Interval one = mean_interval({NAN, 5.0});
  CHECK(one.n == 1);
  CHECK(one.mean == 5.0);
  CHECK(std::isnan(one.half));
  CHECK(!one.below(10.0));
}

TEST_CASE("train_lm: tokens to reach a loss interpolate between evaluations") {
  const std::vector<std::pair<double, double>> curve{{0, 5}, {100, 3}, {200, 1}, {300, 2}};
  CHECK(tokens_to_reach(curve, 2.0) == 150.0);
  CHECK(tokens_to_reach(curve, 3.0) == 100.0);
  CHECK(tokens_to_reach(curve, 6.0) == 0.0);
  CHECK(std::isnan(tokens_to_reach(curve, 0.5)));
  CHECK(std::isnan(tokens_to_reach(curve, NAN)));
  // The best loss so far: a rise (to 4) does not undo the crossing of 3.5,
  // and 2.5 is crossed from the best so far (3), not from the last value (4).
  const std::vector<std::pair<double, double>> noisy{{0, 5}, {100, 3}, {200, 4}, {300, 2}};
  CHECK(tokens_to_reach(noisy, 3.5) == 75.0);
  CHECK(tokens_to_reach(noisy, 2.5) == 250.0);
}

TEST_CASE("train_lm: the tokens ratio compares both runs at the worse final loss") {
  RunResult fast{
      .recipe = "a", .val_loss = 1.0, .val_curve = {{0, 5}, {100, 3}, {200, 1}}, .val_by_k = {}};
  RunResult slow{
      .recipe = "b", .val_loss = 2.0, .val_curve = {{0, 5}, {100, 4}, {200, 2}}, .val_by_k = {}};
  // Both reach 2.0 (the worse final loss): fast at 150 tokens, slow at 200.
  CHECK(tokens_to_same_loss_ratio(fast, slow) == doctest::Approx(0.75));
  CHECK(tokens_to_same_loss_ratio(slow, fast) == doctest::Approx(1.0 / 0.75));
}

TEST_CASE("train_lm: expert dispersion is the within-expert share of the variance") {
  // Expert 0 at (0,0) and (2,0), expert 1 at (10,0) and (12,0): each group
  // scatters 1 + 1 = 2 about its mean, all four 36 + 16 + 16 + 36 = 104 about 6.
  M x(4, 2);
  x << 0, 0, 2, 0, 10, 0, 12, 0;
  const std::vector<int> top1{0, 0, 1, 1};
  ExpertDispersion clustered(2, 2);
  clustered.add(x, top1);
  CHECK(clustered.within_share(moe::single_process()) == doctest::Approx(4.0 / 104.0));
  // Split across two batches, and with a third expert that got no token.
  ExpertDispersion split(3, 2);
  split.add(M(x.topRows(2)), std::span<const int>(top1).first(2));
  split.add(M(x.bottomRows(2)), std::span<const int>(top1).last(2));
  CHECK(split.within_share(moe::single_process()) == doctest::Approx(4.0 / 104.0));
  // Routing blind to x: each expert holds one token of each cluster.
  ExpertDispersion blind(2, 2);
  blind.add(x, std::vector<int>{0, 1, 0, 1});
  // Expert 0: {0, 10} scatters 50, expert 1: {2, 12} scatters 50.
  CHECK(blind.within_share(moe::single_process()) == doctest::Approx(100.0 / 104.0));
  CHECK(std::isnan(ExpertDispersion(1, 2).within_share(moe::single_process())));
  // A token routed to no expert (-1) is left out; an expert past E is refused.
  ExpertDispersion unrouted(2, 2);
  M with_extra(5, 2);
  with_extra << x, 100, 100;
  unrouted.add(with_extra, std::vector<int>{0, 0, 1, 1, -1});
  CHECK(unrouted.within_share(moe::single_process()) == doctest::Approx(4.0 / 104.0));
  CHECK_THROWS_AS(unrouted.add(x, std::vector<int>{0, 0, 1, 2}), moe::Error);
}

TEST_CASE("train_lm: seed measures pair each recipe's seeds with the baseline's") {
  // Default MoE ends 0.1 below topk with every seed. The runs come in
  // another order than their seeds, and topk lacks seed 4.
  std::vector<RunResult> runs;
  const auto add = [&](const std::string& recipe, std::uint64_t seed, double final_loss,
                       double speed, double dispersion) {
    runs.push_back({.recipe = recipe,
                    .seed = seed,
                    .val_loss = final_loss,
                    .tokens_per_s = speed,
                    .sparsity = 0.75,
                    .dispersion = dispersion,
                    .val_curve = {{0, 4}, {100, final_loss}},
                    .val_by_k = {}});
  };
  add("default-moe", 3, 2.2, 98, 0.8);
  add("topk", 1, 2.1, 100, 0.9);
  add("default-moe", 1, 2.0, 98, 0.8);
  add("topk", 3, 2.3, 100, 0.9);
  add("default-moe", 4, 9.0, 1, 0.1);  // no topk run to pair it with
  add("default-moe", 2, 2.1, 98, 0.8);
  add("topk", 2, 2.2, 100, 0.9);
  const auto measures = seed_measures(runs, {"topk", "default-moe"}, "topk");
  const auto find = [&](const std::string& recipe, const std::string& name) {
    for (const auto& m : measures)
      if (m.recipe == recipe && m.name == name) return m;
    FAIL("no measure " << recipe << " " << name);
    return Measure{};
  };
  CHECK(find("topk", "val_loss").value.mean == doctest::Approx(2.2));
  const Measure d = find("default-moe", "val_loss_minus_topk");
  CHECK(d.value.n == 3);
  CHECK(d.missing == 1);
  CHECK(d.reference == 0.0);
  CHECK(d.value.mean == doctest::Approx(-0.1));
  CHECK(d.value.half == doctest::Approx(0.0).epsilon(1e-9));
  CHECK(d.value.below(0.0));
  // Both reach topk's final loss 2.0 + 0.1 s; from 4 at 0 tokens to the
  // final loss at 100, default-moe gets there at (4 - 2.1) / (4 - 2.0) of
  // the way for seed 1, and so on.
  const Measure reach = find("default-moe", "tokens_to_same_loss_ratio_to_topk");
  CHECK(reach.reference == 1.0);
  CHECK(reach.value.mean == doctest::Approx(((1.9 / 2.0) + (1.8 / 1.9) + (1.7 / 1.8)) / 3));
  CHECK(find("default-moe", "tokens_per_s_ratio_to_topk").value.mean == doctest::Approx(0.98));
  CHECK(find("default-moe", "expert_dispersion_minus_topk").value.mean == doctest::Approx(-0.1));
  // The baseline is not paired with itself.
  for (const auto& m : measures)
    CHECK(!(m.recipe == "topk" && m.name.find("_topk") != std::string::npos));
}
