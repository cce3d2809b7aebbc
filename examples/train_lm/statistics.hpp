#pragma once
// Seed statistics for moe-train-lm --seeds: the mean of a measure over the
// seeds with its 95% confidence interval (Student's t, n - 1 degrees of
// freedom).

#include <cmath>
#include <cstddef>
#include <limits>
#include <vector>

namespace train_lm {

// The 0.975 quantile of Student's t with `df` degrees of freedom: the table
// for 1..30, then 1.96 + 2.5 / df (within 0.002 of the exact value above 30).
inline double student_t_975(std::size_t df) {
  static constexpr double kTable[] = {12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306,
                                      2.262,  2.228, 2.201, 2.179, 2.160, 2.145, 2.131, 2.120,
                                      2.110,  2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
                                      2.060,  2.056, 2.052, 2.048, 2.045, 2.042};
  if (df == 0) return std::numeric_limits<double>::quiet_NaN();
  if (df <= 30) return kTable[df - 1];
  return 1.96 + 2.5 / static_cast<double>(df);
}

// mean ± half: a 95% confidence interval of the mean of n values (half is
// NaN for one value: no interval).
struct Interval {
  std::size_t n = 0;
  double mean = std::numeric_limits<double>::quiet_NaN();
  double half = std::numeric_limits<double>::quiet_NaN();
  double low() const { return mean - half; }
  double high() const { return mean + half; }
  // Whether the interval lies wholly below or above `reference` (needs two
  // values or more).
  bool below(double reference) const { return n >= 2 && high() < reference; }
  bool above(double reference) const { return n >= 2 && low() > reference; }
};

// Non-finite values (a measure a run did not produce) are left out.
inline Interval mean_interval(const std::vector<double>& values) {
  Interval r;
  double sum = 0;
  for (double v : values)
    if (std::isfinite(v)) sum += v, ++r.n;
  if (r.n == 0) return r;
  r.mean = sum / static_cast<double>(r.n);
  if (r.n < 2) return r;
  double squares = 0;
  for (double v : values)
    if (std::isfinite(v)) squares += (v - r.mean) * (v - r.mean);
  const double sd = std::sqrt(squares / static_cast<double>(r.n - 1));
  r.half = student_t_975(r.n - 1) * sd / std::sqrt(static_cast<double>(r.n));
  return r;
}

}  // namespace train_lm
