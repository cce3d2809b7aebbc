// k curricula and SMoE-Dropout's RandomFrozen router (docs/algorithms.md 3.4).

#include <cfenv>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "support.hpp"

using namespace moe;
using namespace moe::test;
namespace sched = moe::router::schedule;

TEST_CASE("Linear: round half to even at the boundaries, clipped to [k_min, k_max]") {
  const sched::Linear s{.k_min = 8, .k_max = 16, .total_steps = 16};
  // (16 - 8) t / 16 = t / 2: t = 1 -> 0.5 -> 0, t = 3 -> 1.5 -> 2, t = 5 -> 2.5 -> 2.
  CHECK(s.k_at(0) == 8);
  CHECK(s.k_at(1) == 8);
  CHECK(s.k_at(2) == 9);
  CHECK(s.k_at(3) == 10);
  CHECK(s.k_at(5) == 10);
  CHECK(s.k_at(7) == 12);
  CHECK(s.k_at(15) == 16);  // 7.5 -> 8
  CHECK(s.k_at(16) == 16);
  CHECK(s.k_at(1000) == 16);
  // Independently: the same formula in long double with the FPU's
  // round-to-nearest-even, for many shapes (x.5 quotients are exact there).
  REQUIRE(std::fegetround() == FE_TONEAREST);
  for (int k_min : {1, 2, 8})
    for (int k_max : {k_min, k_min + 1, k_min + 7, 16})
      for (std::uint64_t total : {1u, 2u, 7u, 16u, 1000u})
        for (std::uint64_t t = 0; t <= total + 3; ++t) {
          const sched::Linear lin{.k_min = k_min, .k_max = k_max, .total_steps = total};
          const long double q =
              static_cast<long double>(k_max - k_min) * static_cast<long double>(t) / total;
          int expected = static_cast<int>(std::nearbyintl(q)) + k_min;
          expected = std::clamp(expected, k_min, k_max);
          CAPTURE(k_min);
          CAPTURE(k_max);
          CAPTURE(total);
          CAPTURE(t);
          CHECK(lin.k_at(t) == expected);
        }
}

namespace {

// Whole sequences k(0..T) of every curriculum of the paper's code
// (calculate_gate_number in SMoE-Dropout's repository), computed by an
// independent Python restatement of it (Python's round, math.cos, float
// pow), stored as the steps where k changes: {t, k(t)}. T = 300 and 999
// put cos(pi t / (2 T)) at pi / 3, where 15 cos lands within 3e-15 of 7.5,
// on different sides: 7.499999999999998 (T = 300, t = 200) rounds to 7,
// 7.500000000000002 (T = 999, t = 666) to 8.
struct Curve {
  const char* mode;
  int k_min, k_max;
  std::uint64_t total;
  std::vector<std::pair<std::uint64_t, int>> changes;
};

const std::vector<Curve>& paper_curves() {
  static const std::vector<Curve> curves = {
      {"linear_increase",
       1,
       16,
       43,
       {{0, 1},
        {2, 2},
        {5, 3},
        {8, 4},
        {11, 5},
        {13, 6},
        {16, 7},
        {19, 8},
        {22, 9},
        {25, 10},
        {28, 11},
        {31, 12},
        {33, 13},
        {36, 14},
        {39, 15},
        {42, 16}}},
      {"linear_increase",
       1,
       16,
       300,
       {{0, 1},
        {11, 2},
        {30, 3},
        {51, 4},
        {70, 5},
        {91, 6},
        {110, 7},
        {131, 8},
        {150, 9},
        {171, 10},
        {190, 11},
        {211, 12},
        {230, 13},
        {251, 14},
        {270, 15},
        {291, 16}}},
      {"linear_increase",
       1,
       16,
       999,
       {{0, 1},
        {34, 2},
        {100, 3},
        {167, 4},
        {234, 5},
        {300, 6},
        {367, 7},
        {433, 8},
        {500, 9},
        {567, 10},
        {633, 11},
        {700, 12},
        {766, 13},
        {833, 14},
        {900, 15},
        {966, 16}}},
      {"linear_increase",
       1,
       16,
       1000,
       {{0, 1},
        {34, 2},
        {100, 3},
        {167, 4},
        {234, 5},
        {301, 6},
        {367, 7},
        {434, 8},
        {500, 9},
        {567, 10},
        {634, 11},
        {701, 12},
        {767, 13},
        {834, 14},
        {900, 15},
        {967, 16}}},
      {"linear_increase",
       8,
       16,
       43,
       {{0, 8}, {3, 9}, {9, 10}, {14, 11}, {19, 12}, {25, 13}, {30, 14}, {35, 15}, {41, 16}}},
      {"linear_increase",
       8,
       16,
       300,
       {{0, 8},
        {19, 9},
        {57, 10},
        {94, 11},
        {132, 12},
        {169, 13},
        {207, 14},
        {244, 15},
        {282, 16}}},
      {"linear_increase",
       8,
       16,
       999,
       {{0, 8},
        {63, 9},
        {188, 10},
        {313, 11},
        {438, 12},
        {562, 13},
        {687, 14},
        {812, 15},
        {937, 16}}},
      {"linear_increase",
       8,
       16,
       1000,
       {{0, 8},
        {63, 9},
        {188, 10},
        {313, 11},
        {438, 12},
        {563, 13},
        {688, 14},
        {813, 15},
        {938, 16}}},
      {"linear_decrease",
       1,
       16,
       43,
       {{0, 16},
        {2, 15},
        {5, 14},
        {8, 13},
        {11, 12},
        {13, 11},
        {16, 10},
        {19, 9},
        {22, 8},
        {25, 7},
        {28, 6},
        {31, 5},
        {33, 4},
        {36, 3},
        {39, 2},
        {42, 1}}},
      {"linear_decrease",
       1,
       16,
       300,
       {{0, 16},
        {11, 15},
        {30, 14},
        {51, 13},
        {70, 12},
        {91, 11},
        {110, 10},
        {131, 9},
        {150, 8},
        {171, 7},
        {190, 6},
        {211, 5},
        {230, 4},
        {251, 3},
        {270, 2},
        {291, 1}}},
      {"linear_decrease",
       1,
       16,
       999,
       {{0, 16},
        {34, 15},
        {100, 14},
        {167, 13},
        {234, 12},
        {300, 11},
        {367, 10},
        {433, 9},
        {500, 8},
        {567, 7},
        {633, 6},
        {700, 5},
        {766, 4},
        {833, 3},
        {900, 2},
        {966, 1}}},
      {"linear_decrease",
       1,
       16,
       1000,
       {{0, 16},
        {34, 15},
        {100, 14},
        {167, 13},
        {234, 12},
        {301, 11},
        {367, 10},
        {434, 9},
        {500, 8},
        {567, 7},
        {634, 6},
        {701, 5},
        {767, 4},
        {834, 3},
        {900, 2},
        {967, 1}}},
      {"linear_decrease",
       8,
       16,
       43,
       {{0, 16}, {3, 15}, {9, 14}, {14, 13}, {19, 12}, {25, 11}, {30, 10}, {35, 9}, {41, 8}}},
      {"linear_decrease",
       8,
       16,
       300,
       {{0, 16},
        {19, 15},
        {57, 14},
        {94, 13},
        {132, 12},
        {169, 11},
        {207, 10},
        {244, 9},
        {282, 8}}},
      {"linear_decrease",
       8,
       16,
       999,
       {{0, 16},
        {63, 15},
        {188, 14},
        {313, 13},
        {438, 12},
        {562, 11},
        {687, 10},
        {812, 9},
        {937, 8}}},
      {"linear_decrease",
       8,
       16,
       1000,
       {{0, 16},
        {63, 15},
        {188, 14},
        {313, 13},
        {438, 12},
        {563, 11},
        {688, 10},
        {813, 9},
        {938, 8}}},
      {"cosine_increase",
       1,
       16,
       43,
       {{0, 1},
        {8, 2},
        {13, 3},
        {17, 4},
        {20, 5},
        {22, 6},
        {25, 7},
        {27, 8},
        {29, 9},
        {31, 10},
        {33, 11},
        {35, 12},
        {37, 13},
        {39, 14},
        {41, 15},
        {43, 16}}},
      {"cosine_increase",
       1,
       16,
       300,
       {{0, 1},
        {50, 2},
        {87, 3},
        {112, 4},
        {134, 5},
        {152, 6},
        {170, 7},
        {185, 8},
        {200, 9},
        {215, 10},
        {229, 11},
        {242, 12},
        {256, 13},
        {269, 14},
        {281, 15},
        {294, 16}}},
      {"cosine_increase",
       1,
       16,
       999,
       {{0, 1},
        {165, 2},
        {287, 3},
        {373, 4},
        {444, 5},
        {506, 6},
        {563, 7},
        {616, 8},
        {667, 9},
        {714, 10},
        {761, 11},
        {806, 12},
        {850, 13},
        {893, 14},
        {936, 15},
        {978, 16}}},
      {"cosine_increase",
       1,
       16,
       1000,
       {{0, 1},
        {165, 2},
        {288, 3},
        {373, 4},
        {444, 5},
        {507, 6},
        {564, 7},
        {617, 8},
        {667, 9},
        {715, 10},
        {761, 11},
        {807, 12},
        {851, 13},
        {894, 14},
        {937, 15},
        {979, 16}}},
      {"cosine_increase",
       8,
       16,
       43,
       {{0, 8}, {10, 9}, {18, 10}, {23, 11}, {27, 12}, {31, 13}, {35, 14}, {38, 15}, {42, 16}}},
      {"cosine_increase",
       8,
       16,
       300,
       {{0, 8},
        {68, 9},
        {119, 10},
        {156, 11},
        {186, 12},
        {214, 13},
        {240, 14},
        {264, 15},
        {289, 16}}},
      {"cosine_increase",
       8,
       16,
       999,
       {{0, 8},
        {227, 9},
        {396, 10},
        {517, 11},
        {620, 12},
        {712, 13},
        {797, 14},
        {880, 15},
        {960, 16}}},
      {"cosine_increase",
       8,
       16,
       1000,
       {{0, 8},
        {227, 9},
        {397, 10},
        {518, 11},
        {620, 12},
        {712, 13},
        {798, 14},
        {880, 15},
        {961, 16}}},
      {"cosine_decrease",
       1,
       16,
       43,
       {{0, 16},
        {8, 15},
        {13, 14},
        {17, 13},
        {20, 12},
        {22, 11},
        {25, 10},
        {27, 9},
        {29, 8},
        {31, 7},
        {33, 6},
        {35, 5},
        {37, 4},
        {39, 3},
        {41, 2},
        {43, 1}}},
      {"cosine_decrease",
       1,
       16,
       300,
       {{0, 16},
        {50, 15},
        {87, 14},
        {112, 13},
        {134, 12},
        {152, 11},
        {170, 10},
        {185, 9},
        {200, 8},
        {215, 7},
        {229, 6},
        {242, 5},
        {256, 4},
        {269, 3},
        {281, 2},
        {294, 1}}},
      {"cosine_decrease",
       1,
       16,
       999,
       {{0, 16},
        {165, 15},
        {287, 14},
        {373, 13},
        {444, 12},
        {506, 11},
        {563, 10},
        {616, 9},
        {667, 8},
        {714, 7},
        {761, 6},
        {806, 5},
        {850, 4},
        {893, 3},
        {936, 2},
        {978, 1}}},
      {"cosine_decrease",
       1,
       16,
       1000,
       {{0, 16},
        {165, 15},
        {288, 14},
        {373, 13},
        {444, 12},
        {507, 11},
        {564, 10},
        {617, 9},
        {667, 8},
        {715, 7},
        {761, 6},
        {807, 5},
        {851, 4},
        {894, 3},
        {937, 2},
        {979, 1}}},
      {"cosine_decrease",
       8,
       16,
       43,
       {{0, 16}, {10, 15}, {18, 14}, {23, 13}, {27, 12}, {31, 11}, {35, 10}, {38, 9}, {42, 8}}},
      {"cosine_decrease",
       8,
       16,
       300,
       {{0, 16},
        {68, 15},
        {119, 14},
        {156, 13},
        {186, 12},
        {214, 11},
        {240, 10},
        {264, 9},
        {289, 8}}},
      {"cosine_decrease",
       8,
       16,
       999,
       {{0, 16},
        {227, 15},
        {396, 14},
        {517, 13},
        {620, 12},
        {712, 11},
        {797, 10},
        {880, 9},
        {960, 8}}},
      {"cosine_decrease",
       8,
       16,
       1000,
       {{0, 16},
        {227, 15},
        {397, 14},
        {518, 13},
        {620, 12},
        {712, 11},
        {798, 10},
        {880, 9},
        {961, 8}}},
      {"exp_increase", 1, 16, 43, {{0, 1}, {4, 2}, {11, 3}, {19, 4}, {27, 5}, {36, 6}}},
      {"exp_increase",
       1,
       16,
       300,
       {{0, 1},
        {4, 2},
        {11, 3},
        {19, 4},
        {27, 5},
        {36, 6},
        {46, 7},
        {57, 8},
        {69, 9},
        {84, 10},
        {100, 11},
        {120, 12},
        {145, 13},
        {179, 14},
        {230, 15}}},
      {"exp_increase",
       1,
       16,
       999,
       {{0, 1},
        {12, 2},
        {33, 3},
        {57, 4},
        {81, 5},
        {108, 6},
        {138, 7},
        {171, 8},
        {207, 9},
        {252, 10},
        {300, 11},
        {360, 12},
        {435, 13},
        {537, 14},
        {690, 15}}},
      {"exp_increase",
       1,
       16,
       1000,
       {{0, 1},
        {12, 2},
        {33, 3},
        {57, 4},
        {81, 5},
        {108, 6},
        {138, 7},
        {171, 8},
        {207, 9},
        {252, 10},
        {300, 11},
        {360, 12},
        {435, 13},
        {537, 14},
        {690, 15}}},
      {"exp_increase", 8, 16, 43, {{0, 8}, {7, 9}, {21, 10}, {38, 11}}},
      {"exp_increase",
       8,
       16,
       300,
       {{0, 8}, {7, 9}, {21, 10}, {38, 11}, {58, 12}, {83, 13}, {116, 14}, {167, 15}, {276, 16}}},
      {"exp_increase",
       8,
       16,
       999,
       {{0, 8},
        {21, 9},
        {63, 10},
        {114, 11},
        {174, 12},
        {249, 13},
        {348, 14},
        {501, 15},
        {828, 16}}},
      {"exp_increase",
       8,
       16,
       1000,
       {{0, 8},
        {21, 9},
        {63, 10},
        {114, 11},
        {174, 12},
        {249, 13},
        {348, 14},
        {501, 15},
        {828, 16}}},
      {"multi_step_increase", 1, 16, 43, {{0, 1}, {9, 2}, {18, 4}, {26, 8}, {35, 16}}},
      {"multi_step_increase", 1, 16, 300, {{0, 1}, {60, 2}, {120, 4}, {180, 8}, {240, 16}}},
      {"multi_step_increase", 1, 16, 999, {{0, 1}, {200, 2}, {400, 4}, {600, 8}, {800, 16}}},
      {"multi_step_increase", 1, 16, 1000, {{0, 1}, {200, 2}, {400, 4}, {600, 8}, {800, 16}}},
      {"multi_step_increase", 8, 16, 43, {{0, 8}, {35, 16}}},
      {"multi_step_increase", 8, 16, 300, {{0, 8}, {240, 16}}},
      {"multi_step_increase", 8, 16, 999, {{0, 8}, {800, 16}}},
      {"multi_step_increase", 8, 16, 1000, {{0, 8}, {800, 16}}},
      {"multi_step_decrease", 1, 16, 43, {{0, 16}, {9, 8}, {18, 4}, {26, 2}, {35, 1}}},
      {"multi_step_decrease", 1, 16, 300, {{0, 16}, {60, 8}, {120, 4}, {180, 2}, {240, 1}}},
      {"multi_step_decrease", 1, 16, 999, {{0, 16}, {200, 8}, {400, 4}, {600, 2}, {800, 1}}},
      {"multi_step_decrease", 1, 16, 1000, {{0, 16}, {200, 8}, {400, 4}, {600, 2}, {800, 1}}},
      {"multi_step_decrease", 8, 16, 43, {{0, 16}, {9, 8}}},
      {"multi_step_decrease", 8, 16, 300, {{0, 16}, {60, 8}}},
      {"multi_step_decrease", 8, 16, 999, {{0, 16}, {200, 8}}},
      {"multi_step_decrease", 8, 16, 1000, {{0, 16}, {200, 8}}},

  };
  return curves;
}

template <class Schedule>
void check_curve(const Curve& c, const Schedule& s) {
  CAPTURE(c.mode);
  CAPTURE(c.k_min);
  CAPTURE(c.k_max);
  CAPTURE(c.total);
  s.validate(16);
  std::size_t next = 0;
  int expected = 0;
  for (std::uint64_t t = 0; t <= c.total; ++t) {
    if (next < c.changes.size() && c.changes[next].first == t) expected = c.changes[next++].second;
    CAPTURE(t);
    CHECK(s.k_at(t) == expected);
  }
  CHECK(next == c.changes.size());
}

}  // namespace

TEST_CASE("every curriculum of the paper's code, on whole sequences") {
  REQUIRE(paper_curves().size() == 56);
  for (const Curve& c : paper_curves()) {
    const std::string mode = c.mode;
    if (mode == "linear_increase") check_curve(c, sched::Linear{c.k_min, c.k_max, c.total});
    if (mode == "linear_decrease") check_curve(c, sched::LinearDecrease{c.k_min, c.k_max, c.total});
    if (mode == "cosine_increase") check_curve(c, sched::CosineIncrease{c.k_min, c.k_max, c.total});
    if (mode == "cosine_decrease") check_curve(c, sched::CosineDecrease{c.k_min, c.k_max, c.total});
    if (mode == "exp_increase") check_curve(c, sched::ExpIncrease{c.k_min, c.k_max, c.total});
    if (mode == "multi_step_increase")
      check_curve(c, sched::MultiStep{c.k_min, c.k_max, c.total, sched::MultiStep::increasing()});
    if (mode == "multi_step_decrease")
      check_curve(c, sched::MultiStep{c.k_min, c.k_max, c.total, sched::MultiStep::decreasing()});
  }
}

TEST_CASE("cosine near .5: IEEE double decides, as in the paper's code") {
  // 15 cos(pi 200 / 600) = 7.499999999999998: 7, so k = 1 + 7 (exact math says 7.5: 8, k = 9).
  CHECK(sched::CosineDecrease{.k_min = 1, .k_max = 16, .total_steps = 300}.k_at(200) == 8);
  CHECK(sched::CosineIncrease{.k_min = 1, .k_max = 16, .total_steps = 300}.k_at(200) == 9);
  // 15 cos(pi 666 / 1998) = 7.500000000000002: 8.
  CHECK(sched::CosineDecrease{.k_min = 1, .k_max = 16, .total_steps = 999}.k_at(666) == 9);
}

TEST_CASE("past total_steps: linear, cosine and multi-step hold, exp_increase keeps rising") {
  const std::uint64_t T = 100;
  CHECK(sched::Linear{1, 16, T}.k_at(10 * T) == 16);
  CHECK(sched::LinearDecrease{1, 16, T}.k_at(10 * T) == 1);
  CHECK(sched::CosineIncrease{1, 16, T}.k_at(4 * T) == 16);  // the formula alone turns back
  CHECK(sched::CosineDecrease{1, 16, T}.k_at(4 * T) == 1);
  CHECK(sched::MultiStep{1, 16, T, sched::MultiStep::increasing()}.k_at(10 * T) == 16);
  const sched::ExpIncrease exp{1, 16, T};
  CHECK(exp.k_at(T) == 11);  // round(-15 0.99^100) + 16 = round(-5.49) + 16
  for (std::uint64_t t = 1; t <= 10 * T; ++t) CHECK(exp.k_at(t) >= exp.k_at(t - 1));
  CHECK(exp.k_at(10 * T) == 16);
}

TEST_CASE("schedules reject bad options") {
  CHECK_THROWS_WITH_AS(sched::Linear({.k_min = 4, .k_max = 2}).validate(8),
                       doctest::Contains("(k_min, k_max)=(4, 2)"), Error);
  CHECK_THROWS_WITH_AS(sched::CosineIncrease({.k_min = 1, .k_max = 9}).validate(8),
                       doctest::Contains("experts=8"), Error);
  CHECK_THROWS_WITH_AS(sched::Linear({.k_min = 1, .k_max = 2, .total_steps = 0}).validate(8),
                       doctest::Contains("total_steps=0"), Error);
  CHECK_THROWS_WITH_AS((sched::MultiStep{1, 8, 10, {}}).validate(8),
                       doctest::Contains("values is empty"), Error);
  CHECK_THROWS_WITH_AS((sched::MultiStep{1, 8, 10, {1, 0}}).validate(8),
                       doctest::Contains("values[1]=0"), Error);
  // A Scheduled router asks for k before anything validates the schedule: no
  // division by zero or empty list read, and the layer refuses it.
  CHECK(sched::MultiStep{}.k_at(0) == 1);
  CHECK((sched::MultiStep{1, 8, 10, {}}).k_at(3) == 1);
  CHECK(sched::CosineIncrease{.k_min = 2, .k_max = 4}.k_at(5) == 2);
  using Frozen = Layer<router::RandomFrozen<sched::MultiStep>, estimator::Sparse,
                       cpu::Backend<double>, act::ReLU>;
  CHECK_THROWS_WITH_AS(
      Frozen({.d_model = 4, .d_ff = 4, .experts = 16}, router::random_frozen(sched::MultiStep{})),
      doctest::Contains("total_steps=0"), Error);
}

namespace {
template <class Act, class Schedule = sched::Linear>
using Frozen = Layer<router::RandomFrozen<Schedule>, estimator::Sparse, cpu::Backend<double>, Act>;
}

TEST_CASE("RandomFrozen: the SMoE-Dropout preset, the curriculum, and its state") {
  using L = Frozen<act::ReLU>;
  L layer({.d_model = 8, .d_ff = 6, .experts = 8, .expert_bias = true},
          router::random_frozen(sched::Linear{.k_min = 2, .k_max = 8, .total_steps = 6}), {}, 4);
  const auto& specs = layer.parameters().layout();
  CHECK_FALSE(specs.at("router.weight").trainable);
  CHECK_FALSE(specs.at("router.bias").trainable);
  CHECK(layer.router().k() == 2);
  const auto x = random_matrix<double>(20, 8, 1), dy = random_matrix<double>(20, 8, 2);
  Mat<double> y(20, 8), dx(20, 8);
  L::Cache cache;
  layer.forward(x, y, cache, Mode::train);
  CHECK(cache.stats().aux_loss == 0);
  CHECK(cache.stats().selected_pairs == 40);
  auto grads = layer.make_gradients();
  layer.backward(x, cache, dy, dx, grads);
  for (double g : grads["router.weight"]) CHECK(g == 0);
  CHECK(dx.norm() > 0);
  // k(t) = clip(round_half_even(6 t / 6) + 2): one more expert per step.
  for (std::uint64_t t = 1; t <= 6; ++t) {
    layer.end_step(t);
    CHECK(layer.router().k() == static_cast<int>(2 + t));
    CHECK(layer.state()["router.step"][0] == static_cast<double>(t));
  }
  // A checkpoint's step restores k.
  L fresh({.d_model = 8, .d_ff = 6, .experts = 8, .expert_bias = true},
          router::random_frozen(sched::Linear{.k_min = 2, .k_max = 8, .total_steps = 6}), {}, 4);
  auto state = layer.state();
  state["router.step"][0] = 3;
  fresh.load_state(state);
  CHECK(fresh.router().k() == 5);
  // Self-slimming: inference at any k in 1..E.
  for (int k = 1; k <= 8; ++k) {
    layer.router().set_k(k);
    layer.forward(x, y, cache, Mode::eval);
    CHECK(cache.stats().selected_pairs == 20 * k);
  }
  // set_k is for inference: training still follows the schedule (k = 8 after
  // 6 steps here, so make it visible by rolling back to step 1, k = 3).
  layer.router().set_k(1);
  auto rollback = layer.state();
  rollback["router.step"][0] = 1;
  layer.load_state(rollback);
  layer.forward(x, y, cache, Mode::train);
  CHECK(cache.stats().selected_pairs == 20 * 3);
  layer.forward(x, y, cache, Mode::eval);
  CHECK(cache.stats().selected_pairs == 20 * 1);
  layer.router().set_k(9);
  CHECK_THROWS_WITH_AS(layer.forward(x, y, cache, Mode::eval), doctest::Contains("k=9"), Error);
}

TEST_CASE_TEMPLATE("RandomFrozen backward matches finite differences", Act, act::ReLU, act::GELU,
                   act::SwiGLU) {
  for (int k : {1, 3, 5}) {
    CAPTURE(k);
    Frozen<Act, sched::Constant> layer(
        {.d_model = 5, .d_ff = 4, .experts = 5, .expert_bias = Act::kSupportsBias},
        router::random_frozen(sched::Constant{k}), {}, 6);
    // A larger random router so the softmax over the selected is not flat.
    for (auto& w : layer.parameters()["router.weight"]) w *= 30;
    const auto x = random_matrix<double>(7, 5, 1), r = random_matrix<double>(7, 5, 2);
    for (const auto& report : check_gradients(layer, x, r, Mode::eval)) {
      CAPTURE(report.block);
      CAPTURE(report.relative());
      CHECK(report.passes());
    }
  }
}

TEST_CASE("a step of 2^53 or more is refused: the state keeps it in a double") {
  using L = Frozen<act::ReLU>;
  L layer({.d_model = 4, .d_ff = 3, .experts = 8},
          router::random_frozen(sched::Linear{.k_min = 2, .k_max = 8, .total_steps = 6}), {}, 4);
  layer.end_step(3);
  const auto state = layer.state();
  constexpr std::uint64_t kLimit = std::uint64_t{1} << 53;
  // Accepted before, and then load_state refused the layer's own state.
  CHECK_THROWS_WITH_AS(layer.set_schedule_step(std::numeric_limits<std::uint64_t>::max()),
                       doctest::Contains("steps=18446744073709551615, expected < 2^53"), Error);
  CHECK_THROWS_WITH_AS(layer.end_step(kLimit + 1), doctest::Contains("steps=9007199254740993"),
                       Error);
  CHECK_THROWS_WITH_AS(layer.router().set_step(kLimit), doctest::Contains("steps=9007199254740992"),
                       Error);
  CHECK(layer.router().steps_done() == 3);
  CHECK(layer.router().k() == 5);
  CHECK(std::equal(state.flat().begin(), state.flat().end(), layer.state().flat().begin()));
  // The largest step there is restores.
  layer.set_schedule_step(kLimit - 1);
  CHECK(layer.router().k() == 8);
  CHECK_NOTHROW(layer.load_state(layer.state()));
  CHECK_NOTHROW(layer.end_step(kLimit - 1));
}

TEST_CASE("k_at before validate: ranges at the int extremes do not overflow") {
  constexpr int lo = std::numeric_limits<int>::min(), hi = std::numeric_limits<int>::max();
  // k_min - k_max overflowed int (undefined behaviour) in the increasing
  // curves; an unusable range is k_min, as an unusable length is.
  CHECK(sched::CosineIncrease{.k_min = lo, .k_max = hi, .total_steps = 10}.k_at(0) == lo);
  CHECK(sched::ExpIncrease{.k_min = lo, .k_max = hi, .total_steps = 10}.k_at(0) == lo);
  CHECK(sched::CosineIncrease{.k_min = 1, .k_max = lo, .total_steps = 10}.k_at(3) == 1);
  CHECK(sched::ExpIncrease{.k_min = hi, .k_max = lo, .total_steps = 10}.k_at(3) == hi);
  CHECK(sched::Linear{.k_min = lo, .k_max = hi, .total_steps = 10}.k_at(5) == lo);
  CHECK(sched::LinearDecrease{.k_min = lo, .k_max = hi, .total_steps = 10}.k_at(5) == lo);
  CHECK(sched::CosineDecrease{.k_min = lo, .k_max = hi, .total_steps = 10}.k_at(5) == lo);
  // A length validate() refuses: 2 T wrapped to 0 in the cosine, 0 / 0.
  CHECK(sched::CosineIncrease{.k_min = 1, .k_max = 4, .total_steps = 1ull << 63}.k_at(0) == 1);
  // The Scheduled constructor asks for k_at(0) first; the layer then refuses the range.
  using L = Frozen<act::ReLU, sched::CosineIncrease>;
  CHECK_THROWS_WITH_AS(
      L({.d_model = 4, .d_ff = 3, .experts = 8},
        router::random_frozen(sched::CosineIncrease{.k_min = lo, .k_max = hi, .total_steps = 10})),
      doctest::Contains("(k_min, k_max)=(-2147483648, 2147483647)"), Error);
}
