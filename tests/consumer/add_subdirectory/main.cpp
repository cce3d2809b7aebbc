// Consumer smoke test: a program building moe as a subproject (add_subdirectory).
#include <Eigen/Core>
#include <cmath>
#include <cstdio>

#include "moe/moe.hpp"

int main() {
  using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using L = moe::Layer<moe::router::TopK, moe::estimator::Sparse, moe::cpu::Backend<float>,
                       moe::act::GELU>;
  L layer({.d_model = 8, .d_ff = 16, .experts = 4}, moe::router::TopK{.k = 2});

  const int T = 5;
  Mat x(T, 8);
  for (int i = 0; i < x.size(); ++i) x.data()[i] = 0.1f * static_cast<float>(i % 7) - 0.3f;
  Mat y(T, 8), dy = Mat::Ones(T, 8), dx(T, 8);
  L::Cache cache;
  layer.forward(x, y, cache, moe::Mode::train);
  auto grads = layer.make_gradients();
  layer.backward(x, cache, dy, dx, grads);

  const bool ok = y.allFinite() && dx.allFinite() && std::isfinite(cache.stats().aux_loss);
  std::printf("moe consumer: y(0,0)=%g dx(0,0)=%g aux=%g -> %s\n", static_cast<double>(y(0, 0)),
              static_cast<double>(dx(0, 0)), static_cast<double>(cache.stats().aux_loss),
              ok ? "ok" : "NOT FINITE");
  return ok ? 0 : 1;
}
