// The CUDA backend's primitives one at a time, each against an independent
// host reference written here with plain loops: a bucket sort by expert for
// dispatch, triple loops in double for the GEMMs, host sums and visit counts
// for the parallel loops. No Eigen and no CPU backend (this is a .cu file, and
// the references share no code with either backend).
//
// Every primitive synchronises, so the managed Buffers are read on the host
// right after each call. Without a CUDA device the program exits 77, which
// CTest reports as skipped (never passed).

#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <iterator>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "moe/cuda.cuh"

// No `using namespace moe`: nvcc's generated code names cuda::std unqualified.
namespace mc = moe::cuda;
using moe::Index;

namespace cuda_primitives_test {

using FloatBackend = mc::Backend<float>;
template <class U>
using Buffer = FloatBackend::Buffer<U>;
using Selection = moe::Selection<float, FloatBackend::Buffer>;
using Dispatch = moe::Dispatch<FloatBackend::Buffer>;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// splitmix64's finaliser: a fixed function of x, the same on host and device.
MOE_HOST_DEVICE inline std::uint64_t mix64(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Deterministic host random numbers (a counter through mix64).
struct Rng {
  std::uint64_t state;
  std::uint64_t next() { return mix64(state++); }
  Index below(Index n) { return static_cast<Index>(next() % static_cast<std::uint64_t>(n)); }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1p-53; }  // [0, 1)
  float symmetric() { return static_cast<float>(2 * uniform() - 1); }       // [-1, 1)
};

// Adds one to *p, atomically in a kernel. The host branch only exists for the
// host compilation of the __host__ __device__ lambdas, which run on the GPU.
MOE_HOST_DEVICE inline void bump(int* p) {
#if defined(__CUDA_ARCH__)
  atomicAdd(p, 1);
#else
  ++*p;
#endif
}

// got (a Buffer or a std::vector) equals want, element by element; the
// message names the first difference.
template <class Got, class Want>
void check_equal(const std::string& what, const Got& got, const std::vector<Want>& want) {
  const auto size = static_cast<std::size_t>(got.size());
  CHECK_MESSAGE(size == want.size(), what, ": size ", size, ", expected ", want.size());
  if (size != want.size()) return;
  std::size_t first = size, differences = 0;
  for (std::size_t i = 0; i < size; ++i) {
    if (got[i] == want[i]) continue;
    if (differences++ == 0) first = i;
  }
  CHECK_MESSAGE(differences == 0, what, ": ", differences, " of ", size,
                " values differ, the first at ", first, ": got ", got[first], ", expected ",
                want[first]);
}

// Expected values of a product and the magnitude of each: the sum of the
// absolute values of its terms (|alpha a_p b_p| and |beta c|), which bounds
// its rounding error (a sum with cancellation is not judged by its small result).
struct Expected {
  std::vector<double> value, magnitude;
};

// max |got - value| <= tolerance * max magnitude; a NaN or Inf in got fails.
void check_close(const std::string& what, const std::vector<double>& got, const Expected& want,
                 double tolerance) {
  REQUIRE(got.size() == want.value.size());
  REQUIRE(got.size() == want.magnitude.size());
  double error = 0, scale = 0;
  std::size_t worst = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double d = std::isfinite(got[i]) ? std::abs(got[i] - want.value[i])
                                           : std::numeric_limits<double>::infinity();
    if (d > error) {
      error = d;
      worst = i;
    }
    scale = std::max(scale, want.magnitude[i]);
  }
  CHECK_MESSAGE(error <= tolerance * scale, what, ": max error ", error, " at ", worst, " (got ",
                got[worst], ", expected ", want.value[worst], "), largest magnitude ", scale,
                ", tolerance ", tolerance);
}

// ---------------------------------------------------------------------------
// dispatch

// A routing in host memory: CSR over tokens, the experts of each token.
struct Routing {
  std::vector<Index> token_offsets{0};
  std::vector<int> pair_expert;
};

struct RoutingCase {
  const char* name;
  Index tokens, experts;
  Index min_k, max_k;  // pairs per token, drawn uniformly in [min_k, max_k]
  int skew;            // expert drawn as floor(allowed * u^skew): low experts favoured
  bool holes;          // experts e % 3 == 0 (and the last, for E > 3) get no pairs
};

// Tokens with a random number of distinct experts each, in random order (the
// router's order), as the top-k (fixed k) and ReLU (variable k) routers give.
Routing random_routing(const RoutingCase& c, std::uint64_t seed) {
  std::vector<int> allowed;
  for (Index e = 0; e < c.experts; ++e)
    if (!c.holes || (e % 3 != 0 && !(c.experts > 3 && e == c.experts - 1)))
      allowed.push_back(static_cast<int>(e));
  const auto choices = static_cast<Index>(allowed.size());
  Rng rng{seed};
  Routing r;
  r.token_offsets.reserve(static_cast<std::size_t>(c.tokens + 1));
  r.pair_expert.reserve(static_cast<std::size_t>(c.tokens * c.max_k));
  std::vector<int> chosen;
  for (Index t = 0; t < c.tokens; ++t) {
    const Index k = std::min(c.min_k + rng.below(c.max_k - c.min_k + 1), choices);
    chosen.clear();
    while (static_cast<Index>(chosen.size()) < k) {
      auto pick =
          static_cast<Index>(static_cast<double>(choices) * std::pow(rng.uniform(), c.skew));
      pick = std::min(pick, choices - 1);
      for (int tries = 0; std::count(chosen.begin(), chosen.end(), allowed[pick]) > 0; ++tries)
        pick = tries < 32 ? rng.below(choices) : (pick + 1) % choices;
      chosen.push_back(allowed[pick]);
    }
    r.pair_expert.insert(r.pair_expert.end(), chosen.begin(), chosen.end());
    r.token_offsets.push_back(static_cast<Index>(r.pair_expert.size()));
  }
  return r;
}

struct DispatchReference {
  std::vector<Index> pair_token, pair_row, row_pair, row_token, expert_offsets{0}, selected, kept;
  std::vector<int> row_expert;
  Index dropped = 0;
};

// The pairs stably sorted by expert (one bucket per expert, filled in pair
// order), the first `capacity` of each bucket kept (all for capacity < 0),
// rows numbered bucket by bucket.
DispatchReference reference_dispatch(const Routing& routing, Index experts, Index capacity) {
  DispatchReference ref;
  const auto tokens = static_cast<Index>(routing.token_offsets.size()) - 1;
  const auto pairs = static_cast<Index>(routing.pair_expert.size());
  ref.pair_token.resize(static_cast<std::size_t>(pairs));
  for (Index t = 0; t < tokens; ++t)
    for (Index p = routing.token_offsets[t]; p < routing.token_offsets[t + 1]; ++p)
      ref.pair_token[p] = t;
  std::vector<std::vector<Index>> bucket(static_cast<std::size_t>(experts));
  for (Index p = 0; p < pairs; ++p) bucket[routing.pair_expert[p]].push_back(p);
  ref.pair_row.assign(static_cast<std::size_t>(pairs), -1);
  for (Index e = 0; e < experts; ++e) {
    const auto selected = static_cast<Index>(bucket[e].size());
    const Index kept = capacity < 0 ? selected : std::min(selected, capacity);
    ref.selected.push_back(selected);
    ref.kept.push_back(kept);
    for (Index rank = 0; rank < kept; ++rank) {
      const Index p = bucket[e][rank];
      ref.pair_row[p] = static_cast<Index>(ref.row_pair.size());
      ref.row_pair.push_back(p);
      ref.row_expert.push_back(static_cast<int>(e));
      ref.row_token.push_back(ref.pair_token[p]);
    }
    ref.expert_offsets.push_back(static_cast<Index>(ref.row_pair.size()));
  }
  ref.dropped = pairs - static_cast<Index>(ref.row_pair.size());
  return ref;
}

void check_dispatch(const Dispatch& out, const DispatchReference& ref) {
  check_equal("pair_token", out.pair_token, ref.pair_token);
  check_equal("pair_row", out.pair_row, ref.pair_row);
  check_equal("row_pair", out.row_pair, ref.row_pair);
  check_equal("row_expert", out.row_expert, ref.row_expert);
  check_equal("row_token", out.row_token, ref.row_token);
  check_equal("row_offsets", out.row_offsets, ref.expert_offsets);
  check_equal("expert_offsets", out.expert_offsets, ref.expert_offsets);
  check_equal("selected_per_expert", out.selected_per_expert, ref.selected);
  check_equal("rows_per_expert", out.rows_per_expert, ref.kept);
  CHECK(out.dropped == ref.dropped);
  CHECK(out.rows() == static_cast<Index>(ref.row_pair.size()));
}

// Largest first: the one Dispatch is reused, so later cases shrink it.
const RoutingCase kRoutingCases[] = {
    {"1M pairs (T=250000, k=4, E=64, skewed)", 250000, 64, 4, 4, 2, false},
    {"T=0", 0, 8, 0, 0, 1, false},
    {"tokens without pairs (P=0)", 100, 8, 0, 0, 1, false},
    {"E=1, 0 or 1 pair per token", 1000, 1, 0, 1, 1, false},
    {"E=1, every token", 777, 1, 1, 1, 1, false},
    {"E=1, the expert excluded (P=0)", 50, 1, 1, 1, 1, true},
    {"E=2, 0 to 2 pairs per token", 5000, 2, 0, 2, 1, false},
    {"E=2, expert 0 idle", 300, 2, 1, 2, 1, true},
    {"E=7, skewed, idle experts", 3001, 7, 1, 3, 2, true},
    {"E=8, k=2", 4096, 8, 2, 2, 1, false},
    {"E=9, ReLU-like, idle experts", 999, 9, 0, 4, 1, true},
    {"E=9, one token on every expert", 1, 9, 9, 9, 1, false},
    {"E=64, ReLU-like, skewed, idle experts", 2000, 64, 0, 8, 3, true},
    {"E=257, ReLU-like, skewed, idle experts", 20000, 257, 0, 6, 3, true},
    {"E=257, k=2", 30001, 257, 2, 2, 1, false},
    {"E=257, k=1, few tokens (most experts idle)", 50, 257, 1, 1, 1, false},
};

TEST_CASE("dispatch matches a stable bucket sort by expert, for every capacity") {
  const FloatBackend be(0);
  Selection sel;
  Dispatch out;  // reused across cases, as the layer reuses its own
  std::uint64_t seed = 1000;
  for (const RoutingCase& c : kRoutingCases) {
    const Routing routing = random_routing(c, seed++);
    sel.tokens = c.tokens;
    sel.experts = c.experts;
    sel.token_offsets.assign(routing.token_offsets.begin(), routing.token_offsets.end());
    sel.pair_expert.assign(routing.pair_expert.begin(), routing.pair_expert.end());
    const Index pairs = sel.pairs();
    const DispatchReference all = reference_dispatch(routing, c.experts, -1);
    const Index largest =
        all.selected.empty() ? 0 : *std::max_element(all.selected.begin(), all.selected.end());
    std::vector<Index> capacities = {-1, 0, 1, 2, 3, largest / 2, largest, largest + 1, pairs + 7};
    if (largest > 0) capacities.push_back(largest - 1);
    std::sort(capacities.begin(), capacities.end());
    capacities.erase(std::unique(capacities.begin(), capacities.end()), capacities.end());
    for (const Index capacity : capacities) {
      INFO(std::string(c.name));
      CAPTURE(c.tokens);
      CAPTURE(c.experts);
      CAPTURE(pairs);
      CAPTURE(largest);
      CAPTURE(capacity);
      be.dispatch(sel, capacity, out);
      check_dispatch(out, capacity < 0 ? all : reference_dispatch(routing, c.experts, capacity));
    }
    if (&c == &kRoutingCases[0]) CHECK(pairs == 1000000);  // the case is what it is named
  }
}

// ---------------------------------------------------------------------------
// offsets_from_counts

TEST_CASE("offsets_from_counts is an exclusive scan with the total appended") {
  const FloatBackend be(0);
  for (const Index n : {Index{0}, Index{1}, Index{1000}, Index{300000}}) {
    for (const bool large : {false, true}) {
      CAPTURE(n);
      CAPTURE(large);
      Rng rng{static_cast<std::uint64_t>(n) * 2 + large};
      Buffer<Index> counts, offsets;
      counts.resize(static_cast<std::size_t>(n));
      // large: counts up to 2^33, a total beyond 32 bits.
      for (Index i = 0; i < n; ++i)
        counts[i] = rng.below(4) == 0 ? 0 : rng.below(large ? Index{1} << 33 : 100);
      offsets.resize(static_cast<std::size_t>(n + 1));
      std::fill(offsets.begin(), offsets.end(), Index{-7});
      std::vector<Index> want{0};
      for (Index i = 0; i < n; ++i) want.push_back(want.back() + counts[i]);
      const Index total = be.offsets_from_counts(counts.data(), n, offsets.data());
      CHECK(total == want.back());
      check_equal("offsets", offsets, want);
    }
  }
}

// ---------------------------------------------------------------------------
// gemm, gemm_rows

struct GemmShape {
  Index m, n, k;
};
const GemmShape kGemmShapes[] = {{1, 1, 1},   {1, 7, 5},    {7, 1, 3},    {5, 3, 1},
                                 {33, 17, 9}, {64, 65, 31}, {300, 9, 17}, {3, 5, 0}};

// A row-major (rows, cols) matrix with row stride ld: random values, NaN in
// the padding (a product that read it would turn NaN). At least one element.
void random_matrix(Buffer<float>& m, Index rows, Index cols, Index ld, Rng& rng) {
  m.resize(static_cast<std::size_t>(std::max<Index>(rows * ld, 1)));
  std::fill(m.begin(), m.end(), kNaN);
  for (Index r = 0; r < rows; ++r)
    for (Index c = 0; c < cols; ++c) m[r * ld + c] = rng.symmetric();
}

// C (m, n) = alpha op(A) op(B) + beta C0 in double, dense (row stride n).
Expected reference_gemm(bool trans_a, bool trans_b, Index m, Index n, Index k, double alpha,
                        const Buffer<float>& a, Index lda, const Buffer<float>& b, Index ldb,
                        double beta, const std::vector<float>& c0, Index ldc) {
  Expected c;
  for (Index i = 0; i < m; ++i)
    for (Index j = 0; j < n; ++j) {
      double sum = 0, magnitude = 0;
      for (Index p = 0; p < k; ++p) {
        const double term = static_cast<double>(trans_a ? a[p * lda + i] : a[i * lda + p]) *
                            static_cast<double>(trans_b ? b[j * ldb + p] : b[p * ldb + j]);
        sum += term;
        magnitude += std::abs(term);
      }
      const double c_term = beta == 0 ? 0.0 : beta * static_cast<double>(c0[i * ldc + j]);
      c.value.push_back(alpha * sum + c_term);
      c.magnitude.push_back(std::abs(alpha) * magnitude + std::abs(c_term));
    }
  return c;
}

// One product through gemm (or gemm_rows when rows_only), with every leading
// dimension above its minimum; checks C against the reference and its
// padding unchanged. beta = 0 starts from NaN in C: it must not be read.
void check_gemm(const FloatBackend& be, bool rows_only, bool trans_a, bool trans_b, GemmShape s,
                float alpha, float beta, Rng& rng) {
  const Index a_rows = trans_a ? s.k : s.m, a_cols = trans_a ? s.m : s.k;
  const Index b_rows = trans_b ? s.n : s.k, b_cols = trans_b ? s.k : s.n;
  const Index lda = a_cols + 3, ldb = b_cols + 2, ldc = s.n + 5;
  Buffer<float> a, b, c;
  random_matrix(a, a_rows, a_cols, lda, rng);
  random_matrix(b, b_rows, b_cols, ldb, rng);
  constexpr float kPadding = 12345.0f;
  c.resize(static_cast<std::size_t>(s.m * ldc));
  for (Index i = 0; i < s.m; ++i)
    for (Index j = 0; j < ldc; ++j)
      c[i * ldc + j] = j >= s.n ? kPadding : beta == 0 ? kNaN : rng.symmetric();
  const std::vector<float> c0(c.begin(), c.end());
  const Expected want =
      reference_gemm(trans_a, trans_b, s.m, s.n, s.k, alpha, a, lda, b, ldb, beta, c0, ldc);
  if (rows_only)
    be.gemm_rows(trans_b, s.m, s.n, s.k, alpha, a.data(), lda, b.data(), ldb, beta, c.data(), ldc);
  else
    be.gemm(trans_a, trans_b, s.m, s.n, s.k, alpha, a.data(), lda, b.data(), ldb, beta, c.data(),
            ldc);
  std::vector<double> got;
  std::vector<float> padding, padding_want;
  for (Index i = 0; i < s.m; ++i)
    for (Index j = 0; j < ldc; ++j) {
      if (j < s.n) {
        got.push_back(c[i * ldc + j]);
      } else {
        padding.push_back(c[i * ldc + j]);
        padding_want.push_back(kPadding);
      }
    }
  check_close("C", got, want, 1e-5);
  check_equal("C's padding", padding, padding_want);
}

TEST_CASE("gemm: every transpose, beta 0, 1 and 0.5, padded leading dimensions") {
  const FloatBackend be(0);
  Rng rng{42};
  for (const bool trans_a : {false, true})
    for (const bool trans_b : {false, true})
      for (const GemmShape& s : kGemmShapes)
        for (const float beta : {0.0f, 1.0f, 0.5f}) {
          CAPTURE(trans_a);
          CAPTURE(trans_b);
          CAPTURE(s.m);
          CAPTURE(s.n);
          CAPTURE(s.k);
          CAPTURE(beta);
          check_gemm(be, false, trans_a, trans_b, s, beta == 1 ? 0.75f : -1.25f, beta, rng);
        }
}

TEST_CASE("gemm_rows: both transposes of B, beta 0, 1 and 0.5, padded leading dimensions") {
  const FloatBackend be(0);
  Rng rng{43};
  for (const bool trans_b : {false, true})
    for (const GemmShape& s : kGemmShapes)
      for (const float beta : {0.0f, 1.0f, 0.5f}) {
        CAPTURE(trans_b);
        CAPTURE(s.m);
        CAPTURE(s.n);
        CAPTURE(s.k);
        CAPTURE(beta);
        check_gemm(be, true, false, trans_b, s, beta == 1 ? 0.75f : -1.25f, beta, rng);
      }
}

// ---------------------------------------------------------------------------
// grouped_gemm, grouped_gemm_tn

// Rows per expert: empty experts (first and last among them), one expert
// with every row, E = 1, none empty, only the last, and no rows at all.
const std::vector<Index> kExpertRows[] = {
    {0, 5, 0, 17, 1, 0, 33, 0}, {0, 0, 40, 0, 0}, {23},
    {3, 1, 4, 1, 5, 9, 2, 6},   {0, 0, 0, 7},     {0, 0, 0},
};
const std::pair<Index, Index> kGroupedShapes[] = {{1, 1}, {7, 5}, {33, 17}, {64, 48}};  // (n, k)

std::vector<Index> offsets_of(const std::vector<Index>& rows) {
  std::vector<Index> offsets{0};
  for (const Index r : rows) offsets.push_back(offsets.back() + r);
  return offsets;
}

// The value the GEMM multiplies: v, or v rounded to bf16 for bf16 experts.
template <class T>
double operand(float v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    return static_cast<double>(__bfloat162float(__float2bfloat16(v)));
  else
    return static_cast<double>(v);
}

// Values that must come back unchanged, and their positions.
struct Untouched {
  std::vector<std::size_t> at;
  std::vector<float> value;
  void check(const std::string& what, const Buffer<float>& m) const {
    std::vector<float> got;
    for (const std::size_t i : at) got.push_back(m[i]);
    check_equal(what, got, value);
  }
};

// bf16: against the exact product to `tolerance`, and against the product of
// the bf16-rounded operands (fp32 accumulation) to `rounded_tolerance`.
template <class T>
void check_grouped_gemm(const mc::Backend<T>& be, const std::vector<Index>& offsets, bool trans_b,
                        Index n, Index k, float beta, double tolerance, double rounded_tolerance,
                        Rng& rng) {
  const auto E = static_cast<Index>(offsets.size()) - 1;
  const Index rows = offsets.back(), b_stride = k * n + 3;
  Buffer<float> a, b, c;
  random_matrix(a, rows, k, k, rng);
  // The experts' weights, NaN in the gaps between them and in the weights of
  // experts without rows (never multiplied).
  b.resize(static_cast<std::size_t>(E * b_stride));
  std::fill(b.begin(), b.end(), kNaN);
  for (Index e = 0; e < E; ++e)
    if (offsets[e + 1] > offsets[e])
      for (Index i = 0; i < k * n; ++i) b[e * b_stride + i] = rng.symmetric();
  c.resize(static_cast<std::size_t>(std::max<Index>(rows * n, 1)));
  for (Index i = 0; i < rows * n; ++i) c[i] = beta == 0 ? kNaN : rng.symmetric();
  // Rows in order, expert by expert: the same order as C's.
  Expected exact, rounded;
  for (Index e = 0; e < E; ++e)
    for (Index r = offsets[e]; r < offsets[e + 1]; ++r)
      for (Index j = 0; j < n; ++j) {
        double sum = 0, sum_rounded = 0, magnitude = 0;
        for (Index p = 0; p < k; ++p) {
          const float av = a[r * k + p];
          const float bv = b[e * b_stride + (trans_b ? j * k + p : p * n + j)];
          sum += static_cast<double>(av) * static_cast<double>(bv);
          sum_rounded += operand<T>(av) * operand<T>(bv);
          magnitude += std::abs(static_cast<double>(av) * static_cast<double>(bv));
        }
        const double c0 = beta == 0 ? 0.0 : beta * static_cast<double>(c[r * n + j]);
        exact.value.push_back(sum + c0);
        rounded.value.push_back(sum_rounded + c0);
        exact.magnitude.push_back(magnitude + std::abs(c0));
      }
  rounded.magnitude = exact.magnitude;
  be.grouped_gemm(offsets, trans_b, n, k, a.data(), b.data(), b_stride, beta, c.data());
  const std::vector<double> got(c.begin(), c.begin() + rows * n);
  check_close("C", got, exact, tolerance);
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    check_close("C (bf16-rounded operands)", got, rounded, rounded_tolerance);
}

template <class T>
void check_grouped_gemm_tn(const mc::Backend<T>& be, const std::vector<Index>& offsets, Index k,
                           Index n, double tolerance, double rounded_tolerance, Rng& rng) {
  const auto E = static_cast<Index>(offsets.size()) - 1;
  const Index rows = offsets.back(), w_stride = k * n + 5;
  Buffer<float> a, b, w;
  random_matrix(a, rows, k, k, rng);
  random_matrix(b, rows, n, n, rng);
  w.resize(static_cast<std::size_t>(E * w_stride));
  for (Index i = 0; i < E * w_stride; ++i) w[i] = rng.symmetric();
  // Experts without rows and the gaps between experts: unchanged.
  Untouched untouched;
  Expected exact, rounded;
  for (Index e = 0; e < E; ++e) {
    const Index begin = e * w_stride;
    for (Index i = 0; i < w_stride; ++i) {
      if (i < k * n && offsets[e + 1] > offsets[e]) continue;
      untouched.at.push_back(static_cast<std::size_t>(begin + i));
      untouched.value.push_back(w[begin + i]);
    }
    if (offsets[e + 1] == offsets[e]) continue;
    for (Index i = 0; i < k; ++i)
      for (Index j = 0; j < n; ++j) {
        double sum = 0, sum_rounded = 0, magnitude = 0;
        for (Index r = offsets[e]; r < offsets[e + 1]; ++r) {
          const float av = a[r * k + i], bv = b[r * n + j];
          sum += static_cast<double>(av) * static_cast<double>(bv);
          sum_rounded += operand<T>(av) * operand<T>(bv);
          magnitude += std::abs(static_cast<double>(av) * static_cast<double>(bv));
        }
        const auto w0 = static_cast<double>(w[begin + i * n + j]);
        exact.value.push_back(w0 + sum);
        rounded.value.push_back(w0 + sum_rounded);
        exact.magnitude.push_back(magnitude + std::abs(w0));
      }
  }
  rounded.magnitude = exact.magnitude;
  be.grouped_gemm_tn(offsets, k, n, a.data(), b.data(), w.data(), w_stride);
  std::vector<double> got;
  for (Index e = 0; e < E; ++e)
    if (offsets[e + 1] > offsets[e])
      for (Index i = 0; i < k * n; ++i) got.push_back(w[e * w_stride + i]);
  check_close("W", got, exact, tolerance);
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    check_close("W (bf16-rounded operands)", got, rounded, rounded_tolerance);
  untouched.check("W of experts without rows, and the gaps", w);
}

template <class T>
void grouped_gemm_cases(double tolerance, double rounded_tolerance) {
  const mc::Backend<T> be(0);
  Rng rng{std::is_same_v<T, float> ? 7u : 8u};
  for (const std::vector<Index>& expert_rows : kExpertRows) {
    const std::vector<Index> offsets = offsets_of(expert_rows);
    std::string rows_text;
    for (const Index r : expert_rows) rows_text += std::to_string(r) + " ";
    for (const std::pair<Index, Index>& shape : kGroupedShapes) {
      const Index n = shape.first, k = shape.second;
      CAPTURE(rows_text);
      CAPTURE(n);
      CAPTURE(k);
      for (const bool trans_b : {false, true})
        for (const float beta : {0.0f, 1.0f}) {
          CAPTURE(trans_b);
          CAPTURE(beta);
          check_grouped_gemm(be, offsets, trans_b, n, k, beta, tolerance, rounded_tolerance, rng);
        }
      check_grouped_gemm_tn(be, offsets, k, n, tolerance, rounded_tolerance, rng);
    }
  }
}

TEST_CASE("grouped_gemm and grouped_gemm_tn, fp32 experts, to 1e-5") {
  grouped_gemm_cases<float>(1e-5, 1e-5);
}

TEST_CASE("grouped_gemm and grouped_gemm_tn, bf16 operands with fp32 accumulation, to 1e-2") {
  grouped_gemm_cases<__nv_bfloat16>(1e-2, 1e-4);
}

// ---------------------------------------------------------------------------
// first_non_finite

template <class S>
void first_non_finite_cases(const FloatBackend& be) {
  using Limits = std::numeric_limits<S>;
  CHECK(be.first_non_finite(static_cast<const S*>(nullptr), 0) == -1);
  Buffer<S> v;
  CHECK(be.first_non_finite(v.data(), 0) == -1);
  for (const Index n : {Index{1}, Index{2}, Index{1000}, (Index{1} << 20) + 3}) {
    CAPTURE(n);
    Rng rng{static_cast<std::uint64_t>(n)};
    v.resize(static_cast<std::size_t>(n));
    // Finite values, the extreme ones among them (v - v is 0 for them too).
    const S extremes[] = {Limits::max(), -Limits::max(), Limits::denorm_min(),
                          Limits::min(), S(0),           -S(0)};
    for (Index i = 0; i < n; ++i)
      v[i] = rng.below(8) == 0 ? extremes[rng.below(6)] : static_cast<S>(rng.symmetric() * 1e3);
    const std::vector<S> clean(v.begin(), v.end());
    const auto restore = [&] { std::copy(clean.begin(), clean.end(), v.begin()); };
    CHECK(be.first_non_finite(v.data(), n) == -1);
    v[0] = Limits::quiet_NaN();
    CHECK(be.first_non_finite(v.data(), n) == 0);
    restore();
    v[n - 1] = -Limits::quiet_NaN();
    CHECK(be.first_non_finite(v.data(), n) == n - 1);
    restore();
    v[n / 2] = Limits::infinity();
    CHECK(be.first_non_finite(v.data(), n) == n / 2);
    restore();
    v[n / 3] = -Limits::infinity();
    CHECK(be.first_non_finite(v.data(), n) == n / 3);
    restore();
    // Several: the smallest index wins.
    const Index several[] = {n - 1, n / 2, std::min<Index>(7, n - 1)};
    for (const Index i : several) v[i] = Limits::quiet_NaN();
    v[n / 4 + (n > 4)] = Limits::infinity();
    const Index smallest = std::min({n - 1, n / 2, std::min<Index>(7, n - 1), n / 4 + (n > 4)});
    CHECK(be.first_non_finite(v.data(), n) == smallest);
    restore();
    CHECK(be.first_non_finite(v.data(), n) == -1);  // nothing left from the last call
    // A prefix ends before the NaN.
    if (n > 1) {
      v[n - 1] = Limits::quiet_NaN();
      CHECK(be.first_non_finite(v.data(), n - 1) == -1);
      restore();
    }
  }
}

TEST_CASE("first_non_finite: the smallest index of a NaN or Inf, or -1") {
  const FloatBackend be(0);
  SUBCASE("float") { first_non_finite_cases<float>(be); }
  SUBCASE("double") { first_non_finite_cases<double>(be); }
}

// ---------------------------------------------------------------------------
// parallel_for, parallel_for_rows, parallel_sum_rows

// visits[i] == 1 for every i; reports the first i that differs.
void check_once(const std::string& what, const Buffer<int>& visits) {
  std::size_t first = visits.size(), wrong = 0;
  for (std::size_t i = 0; i < visits.size(); ++i)
    if (visits[i] != 1 && wrong++ == 0) first = i;
  CHECK_MESSAGE(wrong == 0, what, ": ", wrong, " of ", visits.size(),
                " not visited exactly once, the first at ", first, " (",
                first < visits.size() ? visits[first] : 0, " visits)");
}

TEST_CASE("parallel_for visits every index once, around block and grid boundaries") {
  const FloatBackend be(0);
  const Index grid = Index{32} * be.threads() * 256;  // the grid-stride boundary
  Buffer<int> visits, bad;
  bad.resize(1);
  for (const Index n : {Index{0}, Index{1}, Index{31}, Index{32}, Index{255}, Index{256},
                        Index{257}, grid - 1, grid, grid + 1, 2 * grid + 7, Index{3000017}}) {
    CAPTURE(n);
    visits.resize(static_cast<std::size_t>(n));
    std::fill(visits.begin(), visits.end(), 0);
    bad[0] = 0;
    int* v = visits.data();
    int* flag = bad.data();
    be.parallel_for(n, [=] MOE_HOST_DEVICE(Index i) {
      if (i < 0 || i >= n)
        bump(flag);
      else
        bump(v + i);
    });
    CHECK(bad[0] == 0);
    check_once("visits", visits);
  }
}

TEST_CASE("parallel_for_rows covers every (row, column) once") {
  const FloatBackend be(0);
  const std::pair<Index, Index> shapes[] = {{0, 0},      {0, 5},       {5, 0},     {1, 1},
                                            {1, 31},     {31, 1},      {33, 33},   {1, 257},
                                            {257, 257},  {1000, 3000}, {70000, 1}, {100000, 3},
                                            {66000, 33}, {1, 100000},  {2, 70001}};
  std::vector<std::pair<Index, Index>> all(std::begin(shapes), std::end(shapes));
  // Past the column grid-stride boundary (the grid is at most 32 blocks per
  // multiprocessor of 256 columns), so a thread takes more than one column.
  const Index column_grid = Index{32} * be.threads() * 256;
  all.emplace_back(1, column_grid + 77);
  all.emplace_back(2, 2 * column_grid + 1);
  Buffer<int> visits, bad;
  bad.resize(1);
  for (const std::pair<Index, Index>& shape : all) {
    const Index rows = shape.first, cols = shape.second;
    CAPTURE(rows);
    CAPTURE(cols);
    visits.resize(static_cast<std::size_t>(rows * cols));
    std::fill(visits.begin(), visits.end(), 0);
    bad[0] = 0;
    int* v = visits.data();
    int* flag = bad.data();
    // A span [begin, end) of a row: this backend passes one column, another
    // may pass more; both count.
    be.parallel_for_rows(rows, cols, [=] MOE_HOST_DEVICE(Index r, Index begin, Index end) {
      if (r < 0 || r >= rows || begin < 0 || end > cols || begin >= end) {
        bump(flag);
        return;
      }
      for (Index c = begin; c < end; ++c) bump(v + r * cols + c);
    });
    CHECK(bad[0] == 0);
    check_once("visits", visits);
  }
}

// Terms of the sums, the same on host and device: a function of (i, j).
MOE_HOST_DEVICE inline std::uint64_t term_bits(Index i, Index j) {
  return mix64(static_cast<std::uint64_t>(i) * 0x100000001b3ull ^
               (static_cast<std::uint64_t>(j) << 1));
}

enum class Terms {
  small_integers,  // in [-8, 8]: every float sum here is exact
  reals,           // in [-1, 1), 53 random bits (exact in double)
};

template <class Sum>
MOE_HOST_DEVICE inline Sum term(Terms kind, Index i, Index j) {
  const std::uint64_t bits = term_bits(i, j);
  if (kind == Terms::small_integers) return static_cast<Sum>(static_cast<int>(bits % 17) - 8);
  return static_cast<Sum>(static_cast<double>(bits >> 11) * 0x1p-52 - 1.0);
}

// store(i, sum_j term(i, j)) called once per i with the sum: exact for small
// integers, else within tolerance * sum_j |term(i, j)| of the double sum.
template <class Sum>
void check_sum_rows(const FloatBackend& be, Index n, Index len, Terms kind, double tolerance) {
  Buffer<Sum> sums;
  Buffer<int> stores, bad;
  sums.resize(static_cast<std::size_t>(n));
  stores.resize(static_cast<std::size_t>(n));
  bad.resize(1);
  std::fill(sums.begin(), sums.end(), Sum(-12345));
  std::fill(stores.begin(), stores.end(), 0);
  Sum* out = sums.data();
  int* count = stores.data();
  int* flag = bad.data();
  be.parallel_sum_rows(
      n, len,
      [=] MOE_HOST_DEVICE(Index i, Index j) {
        if (i < 0 || i >= n || j < 0 || j >= len) bump(flag);
        return term<Sum>(kind, i, j);
      },
      [=] MOE_HOST_DEVICE(Index i, Sum s) {
        if (i < 0 || i >= n) {
          bump(flag);
          return;
        }
        out[i] = s;
        bump(count + i);
      });
  CHECK(bad[0] == 0);
  check_once("stores", stores);
  Index first = -1, wrong = 0;
  double got_first = 0, want_first = 0;
  for (Index i = 0; i < n; ++i) {
    double want = 0, magnitude = 0;
    for (Index j = 0; j < len; ++j) {
      const auto t = static_cast<double>(term<Sum>(kind, i, j));
      want += t;
      magnitude += std::abs(t);
    }
    const auto got = static_cast<double>(sums[i]);
    const bool ok =
        kind == Terms::small_integers ? got == want : std::abs(got - want) <= tolerance * magnitude;
    if (!ok && wrong++ == 0) {
      first = i;
      got_first = got;
      want_first = want;
    }
  }
  CHECK_MESSAGE(wrong == 0, wrong, " of ", n, " sums wrong, the first at ", first, ": got ",
                got_first, ", expected ", want_first);
}

TEST_CASE("parallel_sum_rows stores every row's sum once") {
  const FloatBackend be(0);
  std::vector<std::pair<Index, Index>> shapes;  // (n, len)
  for (const Index n : {1, 7, 33, 1000})
    for (const Index len : {0, 1, 31, 32, 33, 1000}) shapes.emplace_back(n, len);
  for (const Index len : {0, 1, 32, 33, 100}) shapes.emplace_back(100000, len);
  // (No SUBCASE inside the loop: doctest would enter each only once.)
  for (const std::pair<Index, Index>& shape : shapes) {
    const Index n = shape.first, len = shape.second;
    CAPTURE(n);
    CAPTURE(len);
    {
      INFO("float, small integers (exact)");
      check_sum_rows<float>(be, n, len, Terms::small_integers, 0);
    }
    {
      INFO("float, reals");
      check_sum_rows<float>(be, n, len, Terms::reals, 1e-5);
    }
    {
      INFO("double, reals");
      check_sum_rows<double>(be, n, len, Terms::reals, 1e-12);
    }
    {
      INFO("Index (64-bit counts, as the routers' load terms), small integers (exact)");
      check_sum_rows<Index>(be, n, len, Terms::small_integers, 0);
    }
  }
}

}  // namespace cuda_primitives_test

int main(int argc, char** argv) {
  if (mc::device_count() == 0) {
    std::puts("test_cuda_primitives: no CUDA device, skipped");
    return 77;
  }
  doctest::Context context;
  context.applyCommandLine(argc, argv);
  return context.run();
}
