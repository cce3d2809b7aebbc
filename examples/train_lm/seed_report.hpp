#pragma once
// moe-train-lm --seeds: each recipe trained once per seed, and per recipe the
// mean and 95% confidence interval of every measure the reproductions use
// (examples/README.md), with paired differences to a baseline recipe. Printed,
// written to seeds.csv and val_curve.csv, and plotted with the seed band.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "report.hpp"
#include "statistics.hpp"

namespace train_lm {

// What one recipe's run with one seed leaves for the statistics.
struct RunResult {
  std::string recipe;
  std::uint64_t seed = 0;
  double val_loss = NAN, tokens_per_s = NAN, sparsity = NAN, dispersion = NAN;
  std::vector<std::pair<double, double>> val_curve;  // (tokens, val loss) at each evaluation
  std::vector<double> val_by_k;                      // self-slimming: [k - 1]
};

// Tokens until the curve's best loss so far first reaches `target` (linear
// between evaluations), NaN if it never does.
inline double tokens_to_reach(const std::vector<std::pair<double, double>>& curve, double target) {
  if (!std::isfinite(target)) return NAN;
  double best = INFINITY;  // the running minimum: a noisy rise does not undo a crossing
  for (std::size_t i = 0; i < curve.size(); ++i) {
    const double previous = best;
    best = std::min(best, curve[i].second);
    if (best > target) continue;
    if (i == 0) return curve[0].first;
    const double t0 = curve[i - 1].first, t1 = curve[i].first;
    return t0 + (t1 - t0) * (previous - target) / (previous - best);
  }
  return NAN;
}

// Tokens the recipe needs for the worse of the two final losses, over the
// tokens the baseline needs for it: both curves reach that loss, below 1
// where the recipe gets there first, and swapping the two inverts it.
inline double tokens_to_same_loss_ratio(const RunResult& recipe, const RunResult& baseline) {
  const double loss = std::max(recipe.val_loss, baseline.val_loss);
  return tokens_to_reach(recipe.val_curve, loss) / tokens_to_reach(baseline.val_curve, loss);
}

struct Measure {
  std::string recipe, name;
  int k = -1;  // the inference k of self-slimming measures
  Interval value;
  std::size_t missing = 0;  // seeds without a value (no baseline run with that seed, ...)
  double reference = NAN;   // what the interval is judged against: 0 (a difference), 1 (a ratio)
};

// Every measure of every recipe, in the order of `recipes`; paired ones
// against `baseline` when it ran.
inline std::vector<Measure> seed_measures(const std::vector<RunResult>& runs,
                                          const std::vector<std::string>& recipes,
                                          const std::string& baseline) {
  const auto of = [&](const std::string& recipe) {
    std::vector<const RunResult*> rs;
    for (const auto& r : runs)
      if (r.recipe == recipe) rs.push_back(&r);
    return rs;
  };
  const auto base = of(baseline);
  const auto base_for = [&](std::uint64_t seed) -> const RunResult* {
    for (const auto* b : base)
      if (b->seed == seed) return b;
    return nullptr;
  };
  std::vector<Measure> out;
  const auto add = [&](const std::string& recipe, const std::string& name,
                       const std::vector<double>& values, double reference = NAN, int k = -1) {
    std::size_t missing = 0;
    for (double v : values) missing += std::isfinite(v) ? 0 : 1;
    out.push_back({recipe, name, k, mean_interval(values), missing, reference});
  };
  for (const auto& recipe : recipes) {
    const auto rs = of(recipe);
    std::vector<double> val, speed, sparsity, dispersion, d_val, speed_ratio, d_dispersion,
        same_loss_ratio;
    for (const auto* r : rs) {
      val.push_back(r->val_loss);
      speed.push_back(r->tokens_per_s);
      sparsity.push_back(r->sparsity);
      dispersion.push_back(r->dispersion);
      if (recipe == baseline) continue;
      // Paired by seed; a seed the baseline lacks counts as missing.
      const RunResult* b = base_for(r->seed);
      d_val.push_back(b ? r->val_loss - b->val_loss : NAN);
      speed_ratio.push_back(b ? r->tokens_per_s / b->tokens_per_s : NAN);
      d_dispersion.push_back(b ? r->dispersion - b->dispersion : NAN);
      same_loss_ratio.push_back(b ? tokens_to_same_loss_ratio(*r, *b) : NAN);
    }
    add(recipe, "val_loss", val);
    if (recipe != baseline) {
      add(recipe, "val_loss_minus_" + baseline, d_val, 0.0);
      add(recipe, "tokens_to_same_loss_ratio_to_" + baseline, same_loss_ratio, 1.0);
      add(recipe, "tokens_per_s_ratio_to_" + baseline, speed_ratio, 1.0);
    }
    add(recipe, "tokens_per_s", speed);
    add(recipe, "sparsity", sparsity);
    add(recipe, "expert_dispersion", dispersion);
    if (recipe != baseline) add(recipe, "expert_dispersion_minus_" + baseline, d_dispersion, 0.0);
    // Self-slimming: the loss at each inference k, and each step k -> k + 1.
    const std::size_t ks = rs.empty() ? 0 : rs.front()->val_by_k.size();
    for (const auto* r : rs)
      moe::detail::require(r->val_by_k.size() == ks, "moe-train-lm: ", recipe, " seed ", r->seed,
                           " has ", r->val_by_k.size(), " inference-k losses, expected ", ks);
    // (All the losses first: consecutive rows draw one line in the plot.)
    for (std::size_t k = 0; k < ks; ++k) {
      std::vector<double> at_k;
      for (const auto* r : rs) at_k.push_back(r->val_by_k[k]);
      add(recipe, "val_loss_at_k", at_k, NAN, static_cast<int>(k + 1));
    }
    for (std::size_t k = 0; k + 1 < ks; ++k) {
      std::vector<double> step;
      for (const auto* r : rs) step.push_back(r->val_by_k[k + 1] - r->val_by_k[k]);
      add(recipe, "val_loss_step_to_next_k", step, 0.0, static_cast<int>(k + 1));
    }
  }
  return out;
}

inline std::string interval_text(const Interval& i) {
  if (i.n == 0) return "-";
  char buf[96];
  if (i.n < 2 || !std::isfinite(i.half))
    std::snprintf(buf, sizeof buf, "%.4g", i.mean);
  else
    std::snprintf(buf, sizeof buf, "%.4g ± %.2g [%.4g, %.4g]", i.mean, i.half, i.low(), i.high());
  return buf;
}

// "below 0" / "above 1" where the interval lies on one side of the
// measure's reference, "0 inside" where it holds it.
inline std::string reference_verdict(const Measure& m) {
  if (!std::isfinite(m.reference) || m.value.n < 2) return "";
  const std::string ref = csv_number(m.reference);
  if (m.value.below(m.reference)) return "below " + ref;
  if (m.value.above(m.reference)) return "above " + ref;
  return ref + " inside";
}

inline void print_seed_report(const std::vector<Measure>& measures, std::size_t seeds) {
  std::printf("\nOver %zu seeds: mean ± half-width [95%% confidence interval, Student t]\n", seeds);
  std::printf("%-14s %-40s %-44s %s\n", "recipe", "measure", "value", "vs reference");
  for (const auto& m : measures) {
    if (m.value.n == 0) continue;
    std::string name = m.name;
    if (m.k >= 0) name += " k=" + std::to_string(m.k);
    std::string note = reference_verdict(m);
    if (m.missing > 0) note += " (" + std::to_string(m.missing) + " seeds without a value)";
    std::printf("%-14s %-40s %-44s %s\n", m.recipe.c_str(), name.c_str(),
                interval_text(m.value).c_str(), note.c_str());
  }
}

inline void write_seeds_csv(const std::filesystem::path& path,
                            const std::vector<Measure>& measures) {
  std::ofstream out(path);
  out << "recipe,measure,k,n,missing,mean,ci_low,ci_high,reference\n";
  for (const auto& m : measures)
    out << m.recipe << ',' << m.name << ',' << (m.k >= 0 ? std::to_string(m.k) : "") << ','
        << m.value.n << ',' << m.missing << ',' << csv_number(m.value.mean, 9) << ','
        << csv_number(m.value.low(), 9) << ',' << csv_number(m.value.high(), 9) << ','
        << csv_number(m.reference) << '\n';
  if (!out) throw moe::Error(moe::detail::concat("moe-train-lm: cannot write ", path.string()));
}

// Per recipe and evaluation: the seeds' mean validation loss, lowest and
// highest (the band of the plot).
inline void write_val_curve_csv(const std::filesystem::path& path,
                                const std::vector<RunResult>& runs,
                                const std::vector<std::string>& recipes) {
  std::ofstream out(path);
  out << "recipe,tokens,n,mean,min,max\n";
  for (const auto& recipe : recipes) {
    std::map<double, std::vector<double>> at;
    for (const auto& r : runs)
      if (r.recipe == recipe)
        for (const auto& [tokens, v] : r.val_curve) at[tokens].push_back(v);
    for (const auto& [tokens, vs] : at) {
      double sum = 0;
      for (double v : vs) sum += v;
      out << recipe << ',' << csv_number(tokens, 12) << ',' << vs.size() << ','
          << csv_number(sum / static_cast<double>(vs.size()), 9) << ','
          << csv_number(*std::min_element(vs.begin(), vs.end()), 9) << ','
          << csv_number(*std::max_element(vs.begin(), vs.end()), 9) << '\n';
    }
  }
  if (!out) throw moe::Error(moe::detail::concat("moe-train-lm: cannot write ", path.string()));
}

// seed_plots.gp: validation loss with the seed band per recipe, and the
// self-slimming curves with their intervals.
inline void write_seed_plots(const std::filesystem::path& dir,
                             const std::vector<std::string>& recipes) {
  std::ofstream gp(dir / "seed_plots.gp");
  gp << "# gnuplot seed_plots.gp (run in this directory)\n"
     << "set datafile separator ','\nset terminal svg size 800,500 dynamic font 'sans,12'\n"
     << "set key outside right\nset grid\nset style fill transparent solid 0.2 noborder\n"
     << "set output 'val_loss_seeds.svg'\n"
     << "set title 'validation loss vs training tokens: seed mean, band from lowest to highest'\n"
     << "set xlabel 'tokens'\nset ylabel 'validation loss (nats/char)'\nset xrange [1:*]\nplot ";
  for (std::size_t i = 0; i < recipes.size(); ++i) {
    const std::string pick = "(strcol(1) eq '" + recipes[i] + "' ? $2 : 1/0)";
    if (i) gp << ", \\\n     ";
    gp << "'val_curve.csv' using " << pick << ":5:6 with filledcurves lc " << i + 1
       << " notitle, \\\n     'val_curve.csv' using " << pick << ":4 with lines lw 2 lc " << i + 1
       << " title '" << recipes[i] << "'";
  }
  gp << "\nset xrange [*:*]\n";
  std::vector<std::string> slimming;
  for (const auto& r : recipes)
    if (has_inference_k(r)) slimming.push_back(r);
  if (!slimming.empty()) {
    gp << "set output 'inference_k_seeds.svg'\n"
       << "set title 'validation loss vs inference k: seed mean and 95% interval'\n"
       << "set xlabel 'experts per token at inference (k)'\nset offsets 0.5, 0.5, 0, 0\nplot ";
    for (std::size_t i = 0; i < slimming.size(); ++i) {
      if (i) gp << ", \\\n     ";
      gp << "'seeds.csv' using (strcol(1) eq '" << slimming[i]
         << "' && strcol(2) eq 'val_loss_at_k' ? $3 : 1/0):6:7:8 with yerrorlines title '"
         << slimming[i] << "'";
    }
    gp << "\n";
  }
  gp.close();
  if (std::system("command -v gnuplot > /dev/null 2>&1") != 0) return;  // write_plots said so
  const std::string cmd = "cd '" + dir.string() + "' && gnuplot seed_plots.gp";
  if (std::system(cmd.c_str()) != 0)
    std::fprintf(stderr, "moe-train-lm: gnuplot failed on %s/seed_plots.gp\n",
                 dir.string().c_str());
}

}  // namespace train_lm
