#pragma once
// What a person looks at: a progress bar, the results table, CSV files and
// gnuplot plots (SVG).

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <moe/core/error.hpp>
#include <string>
#include <vector>

#include "train.hpp"

namespace train_lm {

inline std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0 || seconds > 1e7) return "--:--";
  const auto s = static_cast<long>(seconds + 0.5);
  char buf[32];
  if (s >= 3600)
    std::snprintf(buf, sizeof buf, "%ld:%02ld:%02ld", s / 3600, s / 60 % 60, s % 60);
  else
    std::snprintf(buf, sizeof buf, "%ld:%02ld", s / 60, s % 60);
  return buf;
}

// Redraws one terminal line at most every 0.1 s; on a non-terminal (CI logs)
// prints a line at every tenth of the run instead.
class ProgressBar {
 public:
  // `shown` false: prints nothing (processes other than the first).
  ProgressBar(std::string label, std::uint64_t total, bool shown = true)
      : label_(std::move(label)), total_(total), tty_(isatty(fileno(stderr)) != 0), shown_(shown) {}

  void update(std::uint64_t done, double loss, double val_loss, double tokens_per_s, double eta_s,
              bool force = false) {
    if (!shown_) return;
    const auto now = std::chrono::steady_clock::now();
    if (tty_) {
      if (!force && now - last_ < std::chrono::milliseconds(100)) return;
      last_ = now;
      constexpr int kWidth = 24;
      const int filled =
          static_cast<int>(kWidth * static_cast<double>(done) / static_cast<double>(total_));
      std::string bar;
      for (int i = 0; i < kWidth; ++i) bar += i < filled ? "#" : "-";
      std::fprintf(stderr, "\r%-13s [%s] %6llu/%llu loss %.3f val %s %7.0f tok/s ETA %s \033[K",
                   label_.c_str(), bar.c_str(), static_cast<unsigned long long>(done),
                   static_cast<unsigned long long>(total_), loss, val(val_loss).c_str(),
                   tokens_per_s, format_duration(eta_s).c_str());
    } else {
      const std::uint64_t tenth = total_ / 10 > 0 ? total_ / 10 : 1;
      if (!force && done / tenth == printed_) return;
      printed_ = done / tenth;
      std::fprintf(stderr, "%-13s %6llu/%llu loss %.3f val %s %7.0f tok/s ETA %s\n", label_.c_str(),
                   static_cast<unsigned long long>(done), static_cast<unsigned long long>(total_),
                   loss, val(val_loss).c_str(), tokens_per_s, format_duration(eta_s).c_str());
    }
  }
  void finish() {
    if (shown_ && tty_) std::fprintf(stderr, "\n");
  }

 private:
  static std::string val(double v) {
    char buf[16];
    std::snprintf(buf, sizeof buf, std::isfinite(v) ? "%.3f" : "  -  ", v);
    return buf;
  }
  std::string label_;
  std::uint64_t total_;
  bool tty_;
  bool shown_;
  std::uint64_t printed_ = 0;
  std::chrono::steady_clock::time_point last_{};
};

struct SummaryRow {
  std::string recipe;
  int inference_k = -1;  // smoe-dropout's rows per k; -1: the training k
  double train_loss = NAN, val_loss = NAN, tokens_per_s = NAN;
  double active_parameters = NAN, total_parameters = NAN;
  double sparsity = NAN, max_load_over_mean = NAN, wall_s = NAN;
  std::uint64_t seed = 0;
  double val_bpc() const { return val_loss / std::log(2.0); }
};

// Six significant digits, or `digits` (losses keep nine: runs are compared
// to 1e-5 relative).
inline std::string csv_number(double v, int digits = 6) {
  if (!std::isfinite(v)) return "";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.*g", digits, v);
  return buf;
}

inline void write_metrics_csv(const std::filesystem::path& path,
                              const std::vector<MetricsRow>& rows) {
  std::ofstream out(path);
  out << "recipe,step,tokens,train_loss,val_loss,sparsity,lambda,k,max_load_over_mean,"
         "tokens_per_s,seed\n";
  for (const auto& r : rows)
    out << r.recipe << ',' << r.step << ',' << r.tokens << ',' << csv_number(r.train_loss, 9) << ','
        << csv_number(r.val_loss, 9) << ',' << csv_number(r.sparsity) << ',' << csv_number(r.lambda)
        << ',' << (r.k >= 0 ? std::to_string(r.k) : "") << ',' << csv_number(r.max_load_over_mean)
        << ',' << csv_number(r.tokens_per_s) << ',' << r.seed << '\n';
  if (!out) throw moe::Error(moe::detail::concat("moe-train-lm: cannot write ", path.string()));
}

inline void write_summary_csv(const std::filesystem::path& path,
                              const std::vector<SummaryRow>& rows) {
  std::ofstream out(path);
  out << "recipe,inference_k,train_loss,val_loss,val_bpc,tokens_per_s,active_parameters,"
         "total_parameters,sparsity,max_load_over_mean,wall_s,seed\n";
  for (const auto& r : rows)
    out << r.recipe << ',' << (r.inference_k >= 0 ? std::to_string(r.inference_k) : "") << ','
        << csv_number(r.train_loss, 9) << ',' << csv_number(r.val_loss, 9) << ','
        << csv_number(r.val_bpc()) << ',' << csv_number(r.tokens_per_s) << ','
        << csv_number(r.active_parameters) << ',' << csv_number(r.total_parameters) << ','
        << csv_number(r.sparsity) << ',' << csv_number(r.max_load_over_mean) << ','
        << csv_number(r.wall_s) << ',' << r.seed << '\n';
  if (!out) throw moe::Error(moe::detail::concat("moe-train-lm: cannot write ", path.string()));
}

// `seeds`: the rows name their seed (--seeds).
inline void print_table(const std::vector<SummaryRow>& rows, bool seeds = false) {
  std::printf("\n%-22s %10s %9s %8s %9s %10s %9s %13s\n", "recipe", "train loss", "val loss",
              "val bpc", "tok/s", "active par", "sparsity", "load max/mean");
  for (const auto& r : rows) {
    std::string name = r.recipe;
    if (r.inference_k >= 0) name += " k=" + std::to_string(r.inference_k);
    if (seeds) name += " s" + std::to_string(r.seed);
    std::printf("%-22s %10s %9.4f %8.4f %9s %10.0f %9.3f %13s\n", name.c_str(),
                std::isfinite(r.train_loss) ? csv_number(r.train_loss).c_str() : "", r.val_loss,
                r.val_bpc(),
                r.tokens_per_s > 0 ? csv_number(std::round(r.tokens_per_s)).c_str() : "",
                r.active_parameters, r.sparsity,
                r.max_load_over_mean > 0 ? csv_number(r.max_load_over_mean).c_str() : "");
  }
}

// The plots, as a gnuplot script beside the CSVs; run when gnuplot exists.
// With several seeds, the per-step plots show `seed`'s runs.
inline void write_plots(const std::filesystem::path& dir, const std::vector<std::string>& recipes,
                        std::uint64_t seed) {
  const std::string this_seed = "$11 == " + std::to_string(seed);
  const std::string of_seed = " (seed " + std::to_string(seed) + ")";
  const auto script = dir / "plots.gp";
  std::ofstream gp(script);
  gp << "# gnuplot " << script.filename().string() << " (run in this directory)\n"
     << "set datafile separator ','\nset terminal svg size 800,500 dynamic font 'sans,12'\n"
     << "set key outside right\nset grid\n";
  const auto per_recipe = [&](const std::string& col, const std::string& x) {
    std::string s = "plot ";
    for (std::size_t i = 0; i < recipes.size(); ++i) {
      if (i) s += ", \\\n     ";
      s += "'metrics.csv' using (strcol(1) eq '" + recipes[i] + "' && " + this_seed + " ? $" + x +
           " : 1/0):" + col + " with linespoints pt 7 ps 0.4 title '" + recipes[i] + "'";
    }
    return s + "\n";
  };
  // From the first evaluation after step 0: the initial ln(V) would flatten the curves.
  gp << "set output 'val_loss.svg'\nset title 'validation loss vs training tokens" << of_seed
     << "'\n"
     << "set xlabel 'tokens'\nset ylabel 'validation loss (nats/char)'\n"
     << "set xrange [1:*]\n"
     << per_recipe("5", "3") << "set xrange [*:*]\n";
  gp << "set output 'expert_load.svg'\nset title 'expert load: max / mean tokens per expert"
     << of_seed << "'\n"
     << "set xlabel 'step'\nset ylabel 'max load / mean load'\n"
     << per_recipe("9", "2");
  if (std::find(recipes.begin(), recipes.end(), "remoe") != recipes.end()) {
    gp << "set output 'remoe_sparsity.svg'\nset title 'ReMoE: sparsity and lambda" << of_seed
       << "'\n"
       << "set xlabel 'step'\nset ylabel 'sparsity (zero gates)'\nset y2label 'lambda'\n"
       << "set logscale y2\nset y2tics\nset format y2 '%.0e'\nset ytics nomirror\n"
       << "plot 'metrics.csv' using (strcol(1) eq 'remoe' && " << this_seed
       << " ? $2 : 1/0):6 with lines lw 2 title 'sparsity', \\\n     'metrics.csv' using "
          "(strcol(1) eq 'remoe' && "
       << this_seed << " ? $2 : 1/0):7 axes x1y2 with lines title 'lambda'\n"
       << "unset logscale y2\nunset y2tics\nunset y2label\nset ytics mirror\n";
  }
  if (std::find(recipes.begin(), recipes.end(), "smoe-dropout") != recipes.end()) {
    gp << "set output 'smoe_dropout_k.svg'\nset title 'SMoE-Dropout: validation loss vs "
          "inference k"
       << of_seed << "'\nset xlabel 'experts per token at inference (k)'\n"
       << "set ylabel 'validation loss (nats/char)'\nunset key\n"
       << "plot 'summary.csv' using (strcol(1) eq 'smoe-dropout' && strcol(2) ne '' && $12 == "
       << seed << " ? $2 : 1/0):4 with linespoints pt 7 lw 2\n";
  }
  gp.close();
  if (std::system("command -v gnuplot > /dev/null 2>&1") != 0) {
    std::fprintf(stderr,
                 "moe-train-lm: gnuplot not found, plots not drawn; install it (apt-get install "
                 "gnuplot-nox) and run: cd %s && gnuplot plots.gp\n",
                 dir.string().c_str());
    return;
  }
  const std::string cmd = "cd '" + dir.string() + "' && gnuplot plots.gp";
  if (std::system(cmd.c_str()) != 0)
    std::fprintf(stderr, "moe-train-lm: gnuplot failed on %s\n", script.string().c_str());
}

}  // namespace train_lm
