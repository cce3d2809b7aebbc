// The CPU backend's fp32 oneDNN engine (Gemm::onednn_f32, built with
// moe::onednn):
// - its products with the weights equal the exact fp32 products up to the
//   order of the sums (oneDNN's kernel on weights packed once per call), and
//   decode-size batches stay on the skinny kernel, bitwise;
// - its weight gradients are the BLAS (or Eigen) engine's, bitwise;
// - a layer on it equals the BLAS layer up to rounding, for TopK with Sparse
//   and DefaultEMA, GELU and SwiGLU;
// - it is bitwise the same for 1 and 2 threads and across runs, and for
//   several threads calling one layer at once;
// - a double backend refuses it.

#include <stdexcept>
#include <string>
#include <vector>

#include "support.hpp"

using namespace moe;
using namespace moe::test;

namespace {

using Backend = cpu::Backend<float>;
constexpr auto kF32 = cpu::Gemm::onednn_f32;

// This thread's packed weights, emptied: whether a product took the packed
// path shows in whether they grew (on small k, oneDNN's and OpenBLAS's sums
// can even agree bitwise, so results alone cannot tell).
std::vector<cpu::onednn::Line>& emptied_packed_weights() {
  auto& packed = cpu::onednn::Workspace::of_this_thread().packed;
  packed.clear();
  packed.shrink_to_fit();
  return packed;
}

}  // namespace

// Experts of 300, 0 and 700 rows: blocks of 64 rows with a partial last one,
// and an empty expert; B stored (k, n) or (n, k); beta 0 and 0.5.
TEST_CASE("onednn_f32 products with the weights are the fp32 products, in another order") {
  const std::vector<Index> offsets{0, 300, 300, 1000};
  const Index k = 96, n = 160, experts = 3, rows = offsets.back();
  const Mat<float> a = random_matrix<float>(rows, k, 1);
  const Backend f32(2, kF32), exact(1, cpu::Gemm::eigen);
  for (const bool trans_b : {false, true}) {
    for (const float beta : {0.0f, 0.5f}) {
      CAPTURE(trans_b);
      CAPTURE(beta);
      const Mat<float> b = random_matrix<float>(experts * k, n, 2);  // (E k, n) or (E n, k)
      const Mat<float> c0 = random_matrix<float>(rows, n, 3);
      Mat<float> got = c0, want = c0;
      const auto& packed = emptied_packed_weights();
      f32.grouped_gemm(offsets, trans_b, n, k, a.data(), b.data(), k * n, beta, got.data());
      CHECK_FALSE(packed.empty());  // the packed path ran
      exact.grouped_gemm(offsets, trans_b, n, k, a.data(), b.data(), k * n, beta, want.data());
      CHECK(relative_norm(got, want) < 1e-6);
    }
  }
}

TEST_CASE("onednn_f32 products with a weight stride that is not k n, and an empty sum") {
  const std::vector<Index> offsets{0, 70};
  const Index k = 96, n = 160, stride = k * n + 7;
  const Mat<float> a = random_matrix<float>(70, k, 6);
  const Mat<float> b = random_matrix<float>(1, stride, 7);
  Mat<float> got(70, n), want(70, n);
  Backend(2, kF32).grouped_gemm(offsets, false, n, k, a.data(), b.data(), stride, 0.0f, got.data());
  Backend(1, cpu::Gemm::eigen)
      .grouped_gemm(offsets, false, n, k, a.data(), b.data(), stride, 0.0f, want.data());
  CHECK(relative_norm(got, want) < 1e-6);

  Mat<float> c = Mat<float>::Constant(70, 3, 2.0f);
  const float unused = 0;
  Backend(1, kF32).grouped_gemm(offsets, false, 3, 0, &unused, &unused, 0, 0.5f, c.data());
  CHECK(c == Mat<float>::Constant(70, 3, 1.0f));
}

// At most kSkinnyRows rows per expert: the skinny kernel, as on the BLAS
// engine (packing the weights for a few rows would read them twice). And
// the weight gradients run on the BLAS (or Eigen), bitwise.
TEST_CASE("onednn_f32 keeps decode batches on the skinny kernel, weight gradients on the BLAS") {
  const Backend f32(2, kF32), fallback(2);
  const Index n = 160;
  for (const Index k : {Index{96}, Index{300}})  // 300: the split over k
    for (const bool trans_b : {false, true}) {
      CAPTURE(k);
      CAPTURE(trans_b);
      const std::vector<Index> offsets{0, 5, 5, 12};
      const Mat<float> a = random_matrix<float>(12, k, 8), b = random_matrix<float>(3 * k, n, 9);
      Mat<float> got(12, n), want(12, n);
      const auto& packed = emptied_packed_weights();
      f32.grouped_gemm(offsets, trans_b, n, k, a.data(), b.data(), k * n, 0.0f, got.data());
      CHECK(packed.empty());  // nothing packed
      fallback.grouped_gemm(offsets, trans_b, n, k, a.data(), b.data(), k * n, 0.0f, want.data());
      CHECK(same_bits(got, want));
    }
  const Index k = 96;
  const std::vector<Index> offsets{0, 300, 300, 1000};
  const Mat<float> a = random_matrix<float>(1000, k, 10), g = random_matrix<float>(1000, n, 11);
  const Mat<float> w0 = random_matrix<float>(3 * k, n, 12);
  Mat<float> got = w0, want = w0;
  const auto& packed = emptied_packed_weights();
  f32.grouped_gemm_tn(offsets, k, n, a.data(), g.data(), got.data(), k * n);
  CHECK(packed.empty());
  fallback.grouped_gemm_tn(offsets, k, n, a.data(), g.data(), want.data(), k * n);
  CHECK(same_bits(got, want));
}

// A batch with one large expert: the experts of at most kSkinnyRows rows
// still skip packing and run the skinny kernel, bitwise as on the BLAS
// engine (k = 600: oneDNN's blocked sum would differ in the last bits).
TEST_CASE("onednn_f32 leaves experts of a few rows to the skinny kernel in any batch") {
  const Index k = 600, n = 96;
  const std::vector<Index> offsets{0, 100, 103, 103, 111};  // 100, 3, 0 and 8 rows
  const Mat<float> a = random_matrix<float>(111, k, 13), b = random_matrix<float>(4 * k, n, 14);
  for (const bool trans_b : {false, true}) {
    CAPTURE(trans_b);
    Mat<float> got(111, n), want(111, n);
    const auto& packed = emptied_packed_weights();
    Backend(2, kF32).grouped_gemm(offsets, trans_b, n, k, a.data(), b.data(), k * n, 0.0f,
                                  got.data());
    CHECK_FALSE(packed.empty());  // the large expert was packed
    Backend(2, cpu::Gemm::eigen)
        .grouped_gemm(offsets, trans_b, n, k, a.data(), b.data(), k * n, 0.0f, want.data());
    CHECK(relative_norm(got, want) < 1e-6);
    CHECK(same_bits(Mat<float>(got.bottomRows(11)), Mat<float>(want.bottomRows(11))));
  }
}

namespace {

template <class Act, class Estimator>
void check_against_blas(Estimator estimator) {
  CAPTURE(Estimator::kName);
  using L = Layer<router::TopK, Estimator, Backend, Act>;
  const LayerConfig cfg{.d_model = 64, .d_ff = 96, .experts = 4, .expert_bias = Act::kSupportsBias};
  L reference(cfg, router::TopK{.k = 2}, estimator, 11, Backend(2));
  L f32(cfg, router::TopK{.k = 2}, estimator, 11, Backend(2, kF32));
  const Index T = 300;  // about 150 rows per expert: blocks of 64, a partial one
  const auto x = random_matrix<float>(T, cfg.d_model, 21);
  const auto dy = random_matrix<float>(T, cfg.d_model, 22);
  Mat<float> y0(T, cfg.d_model), dx0(T, cfg.d_model), y1(T, cfg.d_model), dx1(T, cfg.d_model);
  auto g0 = reference.make_gradients(), g1 = f32.make_gradients();
  training_step(reference, x, dy, y0, dx0, g0);
  const auto& packed = emptied_packed_weights();
  training_step(f32, x, dy, y1, dx1, g1);
  CHECK_FALSE(packed.empty());  // the engine ran
  // fp32 both: the products sum in another order, nothing more.
  constexpr double kTolerance = 1e-5;
  CHECK(relative_norm(y1, y0) < kTolerance);
  CHECK(relative_norm(dx1, dx0) < kTolerance);
  check_gradients_close(g1, g0, kTolerance, 1e-9);
}

}  // namespace

TEST_CASE_TEMPLATE("an onednn_f32 layer equals the BLAS layer up to rounding", Act, act::GELU,
                   act::SwiGLU) {
  check_against_blas<Act>(estimator::Sparse{});
  check_against_blas<Act>(estimator::DefaultEMA{.beta = 0.8});
}

TEST_CASE("the onednn_f32 layer is bitwise the same for 1 and 2 threads and across runs") {
  using L = Layer<router::TopK, estimator::Sparse, Backend, act::GELU>;
  const LayerConfig cfg{.d_model = 32, .d_ff = 48, .experts = 4, .dropout = 0.1};
  const Index T = 2 * Backend::kTileRows + 300;
  const auto x = random_matrix<float>(T, 32, 8), dy = random_matrix<float>(T, 32, 9);
  std::vector<std::vector<float>> results;
  for (const int threads : {1, 2, 2}) {
    L layer(cfg, router::TopK{.k = 2}, {}, 5, Backend(threads, kF32));
    const auto& packed = emptied_packed_weights();
    results.push_back(training_step_values(layer, x, dy));
    CHECK_FALSE(packed.empty());
  }
  CHECK(results[0] == results[1]);
  CHECK(results[1] == results[2]);
}

// Several threads at once on one layer, each with its own cache: the
// primitives are shared, the packed weights and scratch are the calling
// thread's, so every thread gets the serial results, bitwise (and each ran
// the packed path on its own workspace).
TEST_CASE("concurrent onednn_f32 forwards on one layer give the serial results bitwise") {
  using L = Layer<router::TopK, estimator::Sparse, Backend, act::GELU>;
  constexpr Index d = 32;
  L layer({.d_model = d, .d_ff = 48, .experts = 4}, router::TopK{.k = 2}, {}, 5, Backend(2, kF32));
  std::vector<Mat<float>> xs, serial;
  for (Index i = 0; i < 3; ++i) {  // about 100 to 200 rows per expert: packed products
    xs.push_back(random_matrix<float>(200 + 90 * i, d, 70 + i));
    serial.emplace_back(xs.back().rows(), d);
    L::Cache cache;
    layer.forward(xs.back(), serial.back(), cache, Mode::eval);
  }
  std::vector<int> mismatches(xs.size(), 0), packed(xs.size(), 0);
  run_together(xs.size(), [&](std::size_t i) {   // all threads forward at once
    const auto& own = emptied_packed_weights();  // this thread's workspace
    L::Cache cache;
    Mat<float> y(xs[i].rows(), d);
    for (int repeat = 0; repeat < 20; ++repeat) {
      layer.forward(xs[i], y, cache, Mode::eval);
      mismatches[i] += !same_bits(y, serial[i]);
    }
    packed[i] = !own.empty();
  });
  for (std::size_t i = 0; i < xs.size(); ++i) {
    CHECK(mismatches[i] == 0);
    CHECK(packed[i] == 1);
  }
}

// An exception inside the engine's parallel loops leaves it as a moe::Error
// that names the engine (a dnnl::error, e.g. out of memory, cannot be made
// to happen on demand; this is the path it takes).
TEST_CASE("a failure inside an engine's loop is a moe::Error naming the engine") {
  for (const auto type : {cpu::onednn::Operands::in_f32, cpu::onednn::Operands::in_bf16}) {
    const Backend backend(2, kF32);
    const auto fail_on_7 = [](Index i) {
      if (i == 7) throw std::runtime_error("no memory for item 7");
    };
    const std::string expected =
        std::string("moe::cpu::Backend: gemm=") +
        (type == cpu::onednn::Operands::in_f32 ? "onednn_f32" : "onednn_bf16") +
        ", oneDNN failed: no memory for item 7";
    CHECK_THROWS_WITH_AS(cpu::detail::for_each_call(backend, type, 16, Index{1} << 30, fail_on_7),
                         doctest::Contains(expected.c_str()), moe::Error);
  }
}

TEST_CASE("the onednn_f32 engine is refused for a double backend") {
  CHECK(Backend(1, kF32).gemm_engine() == kF32);
  CHECK(std::string(cpu::to_string(kF32)) == "onednn_f32");
  CHECK_THROWS_WITH_AS(cpu::Backend<double>(1, kF32),
                       doctest::Contains("gemm=onednn_f32, expected a Backend<float>"), moe::Error);
}
