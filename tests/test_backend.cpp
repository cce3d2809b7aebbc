// The CPU backend's products against a naive triple loop in long double, for
// both GEMM engines (Eigen, and the BLAS when the build has one): every
// transpose combination, beta in {0, 1, other}, strided operands, the skinny
// kernel (m <= kSkinnyRows), empty products, and the grouped products with
// empty experts, row tiles and column tiles.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory_resource>
#include <random>

#include "support.hpp"

using namespace moe;
using namespace moe::test;

namespace {

template <class S>
std::vector<S> random_vector(Index n, std::uint64_t seed) {
  std::vector<S> v(static_cast<std::size_t>(n));
  for (Index i = 0; i < n; ++i) v[i] = static_cast<S>(2.0 * math::uniform01(seed, 3, i) - 1.0);
  return v;
}

// C = alpha op(A) op(B) + beta C, row-major with strides, in long double.
template <class S>
void reference_gemm(bool ta, bool tb, Index m, Index n, Index k, S alpha, const S* a, Index lda,
                    const S* b, Index ldb, S beta, S* c, Index ldc) {
  for (Index i = 0; i < m; ++i)
    for (Index j = 0; j < n; ++j) {
      long double sum = 0;
      for (Index p = 0; p < k; ++p)
        sum += static_cast<long double>(ta ? a[p * lda + i] : a[i * lda + p]) *
               static_cast<long double>(tb ? b[j * ldb + p] : b[p * ldb + j]);
      const long double old = beta == S(0) ? 0.0L : static_cast<long double>(beta) * c[i * ldc + j];
      c[i * ldc + j] = static_cast<S>(static_cast<long double>(alpha) * sum + old);
    }
}

template <class S>
double tolerance() {
  return std::is_same_v<S, float> ? 2e-5 : 1e-13;
}

// max |x - y| / (1 + max |y|)
template <class S>
double relative_error(const std::vector<S>& x, const std::vector<S>& y) {
  double diff = 0, scale = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    diff = std::max(diff, std::abs(static_cast<double>(x[i]) - static_cast<double>(y[i])));
    scale = std::max(scale, std::abs(static_cast<double>(y[i])));
  }
  return diff / (1.0 + scale);
}

}  // namespace

TEST_CASE_TEMPLATE("gemm matches a naive product for every engine, transpose, beta and stride", S,
                   float, double) {
  struct Shape {
    Index m, n, k;
  };
  // Skinny (m <= 8), just above it, and a product with several Eigen/BLAS blocks.
  const Shape shapes[] = {{1, 7, 5}, {3, 1, 9}, {8, 70, 33}, {9, 70, 33}, {40, 130, 300}};
  for (const cpu::Gemm engine : gemm_engines()) {
    const cpu::Backend<S> be(1, engine);
    CHECK(be.gemm_engine() == engine);
    for (const Shape& shape : shapes)
      for (int ta = 0; ta < 2; ++ta)
        for (int tb = 0; tb < 2; ++tb)
          for (const S beta : {S(0), S(1), S(-0.5)}) {
            const Index m = shape.m, n = shape.n,
                        k = shape.k;  // (clang 14 cannot capture bindings)
            const std::string engine_name = cpu::to_string(engine);
            CAPTURE(engine_name);
            CAPTURE(m);
            CAPTURE(n);
            CAPTURE(k);
            CAPTURE(ta);
            CAPTURE(tb);
            CAPTURE(beta);
            // Row strides larger than the rows, so that strides are honoured.
            const Index lda = (ta ? m : k) + 3, ldb = (tb ? k : n) + 2, ldc = n + 5;
            const auto a = random_vector<S>((ta ? k : m) * lda, 1);
            const auto b = random_vector<S>((tb ? n : k) * ldb, 2);
            auto c = random_vector<S>(m * ldc, 3);
            if (beta == S(0)) std::fill(c.begin(), c.end(), std::numeric_limits<S>::quiet_NaN());
            auto expected = c;
            be.gemm(ta, tb, m, n, k, S(0.75), a.data(), lda, b.data(), ldb, beta, c.data(), ldc);
            reference_gemm<S>(ta, tb, m, n, k, S(0.75), a.data(), lda, b.data(), ldb, beta,
                              expected.data(), ldc);
            // Padding columns are never touched: compare whole rows including it.
            for (Index i = 0; i < m; ++i)
              for (Index j = n; j < ldc; ++j)
                CHECK(std::memcmp(&c[i * ldc + j], &expected[i * ldc + j], sizeof(S)) == 0);
            for (Index i = 0; i < m; ++i)
              for (Index j = n; j < ldc; ++j) c[i * ldc + j] = expected[i * ldc + j] = 0;
            CHECK(relative_error(c, expected) < tolerance<S>());
          }
  }
}

// The skinny kernel for every row count, with column counts on both sides of
// every SIMD block width (4 to 64 floats) and depths on both sides of its
// chunk: against the naive product, and bitwise against a loop that sums
// each element in the same order (p ascending, alpha a_ip times b_pj, fused
// like Eigen's pmadd), which pins down its determinism.
TEST_CASE_TEMPLATE("skinny kernel: every m <= kSkinnyRows, block and chunk edges, in order", S,
                   float, double) {
  const cpu::Backend<S> be(1, cpu::Gemm::eigen);
  constexpr Index kMaxRows = cpu::Backend<S>::kSkinnyRows;
  for (Index m = 1; m <= kMaxRows; ++m)
    for (const Index n : {1, 3, 4, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 131})
      for (const Index k : {1, 15, 16, 17, 40})
        for (const S beta : {S(0), S(1), S(-0.5)}) {
          CAPTURE(m);
          CAPTURE(n);
          CAPTURE(k);
          CAPTURE(beta);
          const S alpha = S(0.75);
          const auto a = random_vector<S>(m * k, 11), b = random_vector<S>(k * n, 12);
          auto c = random_vector<S>(m * n, 13);
          auto in_order = c, expected = c;
          be.gemm(false, false, m, n, k, alpha, a.data(), k, b.data(), n, beta, c.data(), n);
          reference_gemm<S>(false, false, m, n, k, alpha, a.data(), k, b.data(), n, beta,
                            expected.data(), n);
          CHECK(relative_error(c, expected) < tolerance<S>());
          for (Index i = 0; i < m; ++i)
            for (Index j = 0; j < n; ++j) {
              S sum = beta == S(0)
                          ? S(0)
                          : (beta == S(1) ? in_order[i * n + j] : beta * in_order[i * n + j]);
              for (Index p = 0; p < k; ++p)
                sum = Eigen::internal::pmadd(alpha * a[i * k + p], b[p * n + j], sum);
              in_order[i * n + j] = sum;
            }
          CHECK(std::memcmp(c.data(), in_order.data(), c.size() * sizeof(S)) == 0);
        }
}

TEST_CASE("gemm: an empty sum scales C by beta, empty outputs touch nothing") {
  for (const cpu::Gemm engine : gemm_engines()) {
    const cpu::Backend<float> be(1, engine);
    std::vector<float> c{1, 2, 3, 4}, a{9}, b{9};
    be.gemm(false, false, 2, 2, 0, 1.0f, a.data(), 1, b.data(), 2, 0.5f, c.data(), 2);
    CHECK(c == std::vector<float>{0.5f, 1, 1.5f, 2});
    be.gemm(false, false, 2, 2, 0, 1.0f, a.data(), 1, b.data(), 2, 0.0f, c.data(), 2);
    CHECK(c == std::vector<float>{0, 0, 0, 0});
    c = {7, 7, 7, 7};
    be.gemm(false, false, 0, 2, 3, 1.0f, a.data(), 3, b.data(), 2, 0.0f, c.data(), 2);
    be.gemm(false, false, 2, 0, 3, 1.0f, a.data(), 3, b.data(), 2, 0.0f, c.data(), 2);
    CHECK(c == std::vector<float>{7, 7, 7, 7});
  }
}

TEST_CASE_TEMPLATE("grouped products match per-expert naive products", S, float, double) {
  // Rows per expert: empty experts, skinny ones, one split into row tiles
  // (> kTileRows), and decode-like batches that are split by columns.
  // {100}: one row tile above the skinny kernel, split by columns.
  const std::vector<std::vector<Index>> loads = {
      {0, 3, 0, 1200, 8, 9, 0}, {1, 0, 0, 0}, {2, 1}, {0, 0, 0}, {600}, {100}};
  for (const cpu::Gemm engine : gemm_engines())
    for (const int threads : {1, 2})
      for (const auto& load : loads)
        for (const Index n : {Index{3}, Index{129}, Index{200}})
          for (int tb = 0; tb < 2; ++tb) {
            const std::string engine_name = cpu::to_string(engine);
            CAPTURE(engine_name);
            CAPTURE(threads);
            CAPTURE(n);
            CAPTURE(tb);
            const cpu::Backend<S> be(threads, engine);
            const Index E = static_cast<Index>(load.size()), k = 37;
            std::vector<Index> offsets(static_cast<std::size_t>(E + 1), 0);
            for (Index e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + load[e];
            const Index rows = offsets[E];
            CAPTURE(rows);
            const auto a = random_vector<S>(rows * k, 4);
            const auto b = random_vector<S>(E * k * n, 5);
            auto c = random_vector<S>(rows * n, 6);
            auto expected = c;
            be.grouped_gemm(offsets, tb, n, k, a.data(), b.data(), k * n, S(0.5), c.data());
            for (Index e = 0; e < E; ++e)
              reference_gemm<S>(false, tb, load[e], n, k, S(1), a.data() + offsets[e] * k, k,
                                b.data() + e * k * n, tb ? k : n, S(0.5),
                                expected.data() + offsets[e] * n, n);
            CHECK(relative_error(c, expected) < tolerance<S>());

            // Weight gradient: W_e (k, n) += A_e^T B_e.
            const auto g = random_vector<S>(rows * n, 7);
            auto w = random_vector<S>(E * k * n, 8);
            auto w_expected = w;
            be.grouped_gemm_tn(offsets, k, n, a.data(), g.data(), w.data(), k * n);
            for (Index e = 0; e < E; ++e)
              reference_gemm<S>(true, false, k, n, load[e], S(1), a.data() + offsets[e] * k, k,
                                g.data() + offsets[e] * n, n, S(1), w_expected.data() + e * k * n,
                                n);
            CHECK(relative_error(w, w_expected) < tolerance<S>());
          }
}

TEST_CASE("grouped products are bitwise identical for 1 and 2 threads") {
  const std::vector<Index> offsets{0, 700, 700, 1900, 1905};
  const Index n = 300, k = 64, E = 4;
  const auto a = random_vector<float>(offsets.back() * k, 1);
  const auto b = random_vector<float>(E * k * n, 2);
  for (const cpu::Gemm engine : gemm_engines()) {
    const std::string engine_name = cpu::to_string(engine);
    CAPTURE(engine_name);
    std::vector<float> c1(static_cast<std::size_t>(offsets.back() * n)), c2 = c1;
    std::vector<float> w1(static_cast<std::size_t>(E * k * n), 0.0f), w2 = w1;
    cpu::Backend<float>(1, engine).grouped_gemm(offsets, false, n, k, a.data(), b.data(), k * n,
                                                0.0f, c1.data());
    cpu::Backend<float>(2, engine).grouped_gemm(offsets, false, n, k, a.data(), b.data(), k * n,
                                                0.0f, c2.data());
    cpu::Backend<float>(1, engine).grouped_gemm_tn(offsets, k, n, a.data(), c1.data(), w1.data(),
                                                   k * n);
    cpu::Backend<float>(2, engine).grouped_gemm_tn(offsets, k, n, a.data(), c2.data(), w2.data(),
                                                   k * n);
    CHECK(std::memcmp(c1.data(), c2.data(), c1.size() * sizeof(float)) == 0);
    CHECK(std::memcmp(w1.data(), w2.data(), w1.size() * sizeof(float)) == 0);
  }
}

// Decode-size grouped products (every expert within the skinny kernel, B not
// transposed, k > kSplitDepth) sum over k in parts of kSplitDepth rows: part 0
// into C with beta, each later part from zero, added to C in part order.
// Bitwise against that order built from skinny gemm() calls (each sums in
// order), for 1 and 2 threads; loads with an expert above the skinny kernel
// take the tiled path, whose sums run in order of p.
TEST_CASE("decode-size grouped products sum over k in fixed parts, added in order") {
  using S = float;
  constexpr Index kDepth = cpu::Backend<S>::kSplitDepth;
  constexpr Index kSkinny = cpu::Backend<S>::kSkinnyRows;
  const std::vector<std::vector<Index>> loads = {{0, 3, 0, 1, kSkinny, 2}, {1}, {kSkinny + 1, 2}};
  for (const auto& load : loads)
    for (const Index k : {kDepth, kDepth + 1, 2 * kDepth + 88})
      for (const Index n : {Index{3}, Index{129}})
        for (const S beta : {S(0), S(0.5)}) {
          CAPTURE(load.size());
          CAPTURE(k);
          CAPTURE(n);
          CAPTURE(beta);
          const Index E = static_cast<Index>(load.size());
          std::vector<Index> offsets(static_cast<std::size_t>(E + 1), 0);
          for (Index e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + load[e];
          const Index rows = offsets[E];
          const auto a = random_vector<S>(rows * k, 14), b = random_vector<S>(E * k * n, 15);
          const auto c0 = random_vector<S>(rows * n, 16);
          const bool split = load.front() <= kSkinny && k > kDepth;

          // The expected order, one expert and one part at a time.
          const cpu::Backend<S> serial(1, cpu::Gemm::eigen);
          auto expected = c0;
          for (Index e = 0; e < E; ++e) {
            const Index m = load[e];
            S* ce = expected.data() + offsets[e] * n;
            const S* ae = a.data() + offsets[e] * k;
            const S* be = b.data() + e * k * n;
            const Index first = split ? std::min(k, kDepth) : k;
            serial.gemm(false, false, m, n, first, S(1), ae, k, be, n, beta, ce, n);
            for (Index p0 = first; p0 < k; p0 += kDepth) {
              const Index depth = std::min(kDepth, k - p0);
              std::vector<S> part(static_cast<std::size_t>(m * n));
              serial.gemm(false, false, m, n, depth, S(1), ae + p0, k, be + p0 * n, n, S(0),
                          part.data(), n);
              for (Index i = 0; i < m * n; ++i) ce[i] += part[i];
            }
          }
          auto reference = c0;
          for (Index e = 0; e < E; ++e)
            reference_gemm<S>(false, false, load[e], n, k, S(1), a.data() + offsets[e] * k, k,
                              b.data() + e * k * n, n, beta, reference.data() + offsets[e] * n, n);

          for (const cpu::Gemm engine : gemm_engines())
            for (const int threads : {1, 2}) {
              const std::string engine_name = cpu::to_string(engine);
              CAPTURE(engine_name);
              CAPTURE(threads);
              auto c = c0;
              cpu::Backend<S>(threads, engine)
                  .grouped_gemm(offsets, false, n, k, a.data(), b.data(), k * n, beta, c.data());
              CHECK(relative_error(c, reference) < tolerance<S>());
              if (split || engine == cpu::Gemm::eigen)  // the tiled path: the engine's order
                CHECK(std::memcmp(c.data(), expected.data(), c.size() * sizeof(S)) == 0);
            }
        }
}

// Above kSplitScratchBytes of partial sums a decode-size product is not
// split: its sums run in order of p, as the skinny kernel's.
TEST_CASE("decode-size grouped products whose partial sums would not fit are not split") {
  using S = float;
  const Index E = 8, rows_each = cpu::Backend<S>::kSkinnyRows, k = 257, n = 4160;
  static_assert(cpu::Backend<S>::kSplitScratchBytes < std::size_t{E * rows_each * n * 4});
  std::vector<Index> offsets(E + 1);
  for (Index e = 0; e <= E; ++e) offsets[e] = e * rows_each;
  const auto a = random_vector<S>(E * rows_each * k, 17), b = random_vector<S>(E * k * n, 18);
  std::vector<S> c(static_cast<std::size_t>(E * rows_each * n)), expected = c;
  cpu::Backend<S>(2, cpu::Gemm::eigen)
      .grouped_gemm(offsets, false, n, k, a.data(), b.data(), k * n, S(0), c.data());
  const cpu::Backend<S> serial(1, cpu::Gemm::eigen);
  for (Index e = 0; e < E; ++e)
    serial.gemm(false, false, rows_each, n, k, S(1), a.data() + e * rows_each * k, k,
                b.data() + e * k * n, n, S(0), expected.data() + e * rows_each * n, n);
  CHECK(std::memcmp(c.data(), expected.data(), c.size() * sizeof(S)) == 0);
}

// Blocks of 2 MiB and more are aligned to 2 MiB (offered to transparent huge
// pages), or more when asked; smaller ones keep the alignment asked for; a
// size near SIZE_MAX is a bad_alloc; the resource is one.
TEST_CASE("the CPU backend's memory resource aligns large blocks to huge pages") {
  std::pmr::memory_resource* memory = cpu::Backend<float>(1).memory_resource();
  CHECK(memory == cpu::Backend<double>(2).memory_resource());
  CHECK(memory->is_equal(*cpu::HugePageResource::instance()));
  CHECK_FALSE(memory->is_equal(*std::pmr::new_delete_resource()));
  constexpr std::size_t kHuge = cpu::HugePageResource::kHugePage;
  for (const std::size_t bytes : {std::size_t{8}, kHuge - 1, kHuge, 3 * kHuge + 5}) {
    CAPTURE(bytes);
    void* p = memory->allocate(bytes, alignof(double));
    const auto address = reinterpret_cast<std::uintptr_t>(p);
    CHECK(address % alignof(double) == 0);
    if (bytes >= kHuge) CHECK(address % kHuge == 0);
    std::memset(p, 1, bytes);  // the whole block is usable
    memory->deallocate(p, bytes, alignof(double));
  }
  void* wide = memory->allocate(kHuge, 4 * kHuge);
  CHECK(reinterpret_cast<std::uintptr_t>(wide) % (4 * kHuge) == 0);
  memory->deallocate(wide, kHuge, 4 * kHuge);
  CHECK_THROWS_AS((void)memory->allocate(SIZE_MAX - 100, alignof(double)), std::bad_alloc);
}

TEST_CASE("the GEMM engine is chosen as asked, and blas without a BLAS is an error") {
  CHECK(cpu::Backend<float>(1, cpu::Gemm::eigen).gemm_engine() == cpu::Gemm::eigen);
  const auto automatic = cpu::Backend<float>(1).gemm_engine();
  CHECK(automatic == (cpu::blas::kAvailable ? cpu::Gemm::blas : cpu::Gemm::eigen));
  if (cpu::blas::kAvailable) {
    CHECK(cpu::Backend<double>(1, cpu::Gemm::blas).gemm_engine() == cpu::Gemm::blas);
    CHECK(cpu::blas_info() != "none");
  } else {
    CHECK_THROWS_WITH_AS(cpu::Backend<float>(1, cpu::Gemm::blas), doctest::Contains("gemm=blas"),
                         Error);
    CHECK(cpu::blas_info() == "none");
  }
  MESSAGE("BLAS: " << cpu::blas_info());
}

// This test is not linked with moe::onednn: the bf16 engine is refused with
// what to link (tests/test_bf16.cpp covers the engine itself).
TEST_CASE("a oneDNN engine without oneDNN in the build is an error that says what to link") {
  static_assert(!cpu::onednn::kAvailable);
  CHECK_THROWS_WITH_AS(cpu::Backend<float>(1, cpu::Gemm::onednn_bf16),
                       doctest::Contains("gemm=onednn_bf16, expected automatic, blas or eigen "
                                         "(this build has no oneDNN: link the moe::onednn"),
                       Error);
  CHECK_THROWS_WITH_AS(cpu::Backend<float>(1, cpu::Gemm::onednn_f32),
                       doctest::Contains("gemm=onednn_f32, expected automatic, blas or eigen "
                                         "(this build has no oneDNN: link the moe::onednn"),
                       Error);
}

TEST_CASE("parallel_for_rows visits every (row, column) once, through spans inside the row") {
  for (const int threads : {1, 2}) {
    const cpu::Backend<double> backend(threads);
    for (const auto& shape :
         std::vector<std::pair<Index, Index>>{{0, 5}, {5, 0}, {1, 1}, {7, 3}, {300, 129}}) {
      const Index rows = shape.first, cols = shape.second;  // no structured binding: clang < 16
      CAPTURE(threads);
      CAPTURE(rows);
      CAPTURE(cols);
      std::vector<int> visits(static_cast<std::size_t>(rows * cols), 0);
      std::vector<int> bad_spans(static_cast<std::size_t>(std::max<Index>(rows, 1)), 0);
      int* v = visits.data();
      int* bad = bad_spans.data();
      backend.parallel_for_rows(
          rows, cols,
          [=](Index r, Index begin, Index end) {
            if (r < 0 || r >= rows || begin < 0 || begin >= end || end > cols) {
              bad[r >= 0 && r < rows ? r : 0] += 1;
              return;
            }
            for (Index j = begin; j < end; ++j) v[r * cols + j] += 1;
          },
          rows * cols * 1000);  // enough work for the parallel path
      CHECK(std::count(bad_spans.begin(), bad_spans.end(), 0) ==
            static_cast<std::ptrdiff_t>(bad_spans.size()));
      CHECK(std::count(visits.begin(), visits.end(), 1) ==
            static_cast<std::ptrdiff_t>(visits.size()));
    }
  }
}

TEST_CASE("parallel_sum_rows stores each row's sum of terms, in the terms' type") {
  for (const int threads : {1, 2}) {
    const cpu::Backend<double> backend(threads);
    for (const auto& shape :
         std::vector<std::pair<Index, Index>>{{0, 4}, {3, 0}, {1, 1}, {5, 33}, {257, 70}}) {
      const Index n = shape.first, len = shape.second;
      CAPTURE(threads);
      CAPTURE(n);
      CAPTURE(len);
      std::vector<double> sums(static_cast<std::size_t>(n), -1.0);
      double* out = sums.data();
      // term(i, j) = i + 2 j: the row sums to i len + len (len - 1), exact in double.
      backend.parallel_sum_rows(
          n, len, [](Index i, Index j) { return static_cast<double>(i + 2 * j); },
          [=](Index i, double sum) { out[i] = sum; }, n * len * 1000);
      for (Index i = 0; i < n; ++i)
        CHECK(sums[static_cast<std::size_t>(i)] == static_cast<double>(i * len + len * (len - 1)));
      // A float term is summed, and handed to store, as a float.
      backend.parallel_sum_rows(
          n, len, [](Index, Index) { return 1.0f; },
          [=](Index i, auto sum) {
            static_assert(std::is_same_v<decltype(sum), float>);
            out[i] = static_cast<double>(sum);
          });
      for (Index i = 0; i < n; ++i)
        CHECK(sums[static_cast<std::size_t>(i)] == static_cast<double>(len));
    }
  }
}

// The order parallel_sum_rows documents: kSumLanes running sums over j = l,
// l + L, ..., added pairwise (lane l += lane l + w for w = L/2, ..., 1), then
// the last len % L terms in order; below L terms, plain order of j. Terms
// that round differently in each order tell them apart: the check is bitwise.
float documented_lane_sum(Index len, const std::vector<float>& terms) {
  constexpr int L = cpu::Backend<float>::kSumLanes;
  const auto at = [&](Index j) { return terms[static_cast<std::size_t>(j)]; };
  std::vector<float> lane(L, 0.0f);
  const Index whole = len - len % L;  // the terms the lanes take
  for (Index j = 0; j < whole; j += L)
    for (int l = 0; l < L; ++l) lane[static_cast<std::size_t>(l)] += at(j + l);
  for (int w = L / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l)
      lane[static_cast<std::size_t>(l)] += lane[static_cast<std::size_t>(l + w)];
  float sum = lane[0];
  for (Index j = whole; j < len; ++j) sum += at(j);
  return sum;
}

TEST_CASE("parallel_sum_rows adds in lanes, in an order fixed by the length only") {
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> value(-1.0f, 1.0f);
  for (const Index len : {Index{1}, Index{15}, Index{16}, Index{17}, Index{100}, Index{512}}) {
    CAPTURE(len);
    std::vector<float> terms(static_cast<std::size_t>(len));
    // Magnitudes over 12 binary orders: sums in different orders round differently.
    for (auto& t : terms) {
      const float v = value(rng);
      const int exponent = static_cast<int>(rng() % 12);
      t = v * std::ldexp(1.0f, exponent);
    }
    float sequential = 0.0f;
    for (float t : terms) sequential += t;
    // From 16 terms on, these terms sum differently in lanes than in one
    // running sum, so the bitwise checks below can tell the orders apart.
    if (len >= cpu::Backend<float>::kSumLanes) CHECK(documented_lane_sum(len, terms) != sequential);
    for (const int threads : {1, 2}) {
      const cpu::Backend<float> backend(threads);
      std::vector<float> sums(3, 0.0f);
      float* out = sums.data();
      const float* in = terms.data();
      // Row i's terms are the same terms scaled by 2^i (exact): each row's sum
      // is the documented one scaled, so a row mixed up with another fails.
      backend.parallel_sum_rows(
          3, len, [=](Index i, Index j) { return std::ldexp(in[j], static_cast<int>(i)); },
          [=](Index i, float sum) { out[i] = sum; }, Index{1} << 20);
      for (Index i = 0; i < 3; ++i)
        CHECK(sums[static_cast<std::size_t>(i)] ==
              std::ldexp(documented_lane_sum(len, terms), static_cast<int>(i)));
      if (len < cpu::Backend<float>::kSumLanes) CHECK(sums[0] == sequential);
    }
  }
}

TEST_CASE("parallel_sum_rows sums integer terms exactly at lengths past the lanes") {
  const cpu::Backend<double> backend(2);
  for (const Index len : {Index{16}, Index{33}, Index{70}}) {
    CAPTURE(len);
    std::vector<Index> counts(4, -1);
    Index* out = counts.data();
    // Count the j < len with j % 3 == i % 3 (an Index sum, as the routers' counts).
    backend.parallel_sum_rows(
        4, len, [](Index i, Index j) { return j % 3 == i % 3 ? Index{1} : Index{0}; },
        [=](Index i, Index count) { out[i] = count; }, Index{1} << 20);
    for (Index i = 0; i < 4; ++i) {
      Index expected = 0;
      for (Index j = 0; j < len; ++j) expected += j % 3 == i % 3 ? 1 : 0;
      CHECK(counts[static_cast<std::size_t>(i)] == expected);
    }
  }
}
