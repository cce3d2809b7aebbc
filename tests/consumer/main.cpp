// Consumer smoke test: a program using moe, installed (find_package) or as a
// subproject (add_subdirectory); both consumer projects build this file.
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdio>

#include "moe/moe.hpp"
#ifdef MOE_CONSUMER_IO
#include "moe/io/checkpoint.hpp"
#include "moe/io/safetensors.hpp"
#endif

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

  bool ok = y.allFinite() && dx.allFinite() && std::isfinite(cache.stats().aux_loss);
  // moe::moe's usage requirements carry the BLAS: the layer must run on it.
  const bool on_blas = layer.backend().gemm_engine() == moe::cpu::Gemm::blas;
  ok = ok && on_blas == (MOE_CONSUMER_EXPECT_BLAS != 0);
  std::printf("moe consumer: GEMM engine %s (BLAS: %s)\n",
              moe::cpu::to_string(layer.backend().gemm_engine()), moe::cpu::blas_info().c_str());
#ifdef MOE_CONSUMER_IO
  // The layer through an in-memory safetensors file into a differently seeded one.
  moe::io::SafetensorsWriter writer;
  moe::io::add_layer(writer, layer);
  const auto bytes = writer.serialize();
  L copy({.d_model = 8, .d_ff = 16, .experts = 4}, moe::router::TopK{.k = 2}, {}, 99);
  moe::io::load_layer(moe::io::Safetensors::parse(bytes), copy);
  const auto a = layer.parameters().flat(), b = copy.parameters().flat();
  ok = ok && std::equal(a.begin(), a.end(), b.begin(), b.end());
  std::printf("moe consumer: io round trip of %zu bytes -> %s\n", bytes.size(),
              ok ? "ok" : "MISMATCH");
#endif
#ifdef MOE_CONSUMER_ONEDNN
  // A training forward of a layer on a oneDNN engine: finite outputs.
  const auto forward_on = [&](moe::cpu::Gemm engine) {
    L on_engine({.d_model = 8, .d_ff = 16, .experts = 4}, moe::router::TopK{.k = 2}, {}, 5,
                moe::cpu::Backend<float>(1, engine));
    Mat out(T, 8);
    L::Cache engine_cache;
    on_engine.forward(x, out, engine_cache, moe::Mode::train);
    std::printf("moe consumer: %s engine y(0,0)=%g\n", moe::cpu::to_string(engine),
                static_cast<double>(out(0, 0)));
    return out.allFinite();
  };
  // The bf16 engine links and runs; a CPU without AVX-512 refuses it cleanly.
  try {
    ok = forward_on(moe::cpu::Gemm::onednn_bf16) && ok;
  } catch (const moe::Error& e) {
    std::printf("moe consumer: bf16 engine refused: %s\n", e.what());
  }
  // The fp32 oneDNN engine runs wherever oneDNN does.
  ok = forward_on(moe::cpu::Gemm::onednn_f32) && ok;
#endif
  std::printf("moe consumer: y(0,0)=%g dx(0,0)=%g aux=%g -> %s\n", static_cast<double>(y(0, 0)),
              static_cast<double>(dx(0, 0)), static_cast<double>(cache.stats().aux_loss),
              ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
