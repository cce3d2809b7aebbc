#pragma once
// Shared test helpers: deterministic random matrices, the scalar loss
// L = <R, y> + aux, and central finite differences of it.

#include <doctest/doctest.h>
#include <sys/resource.h>
#include <unistd.h>

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <functional>
#include <latch>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "moe/moe.hpp"

namespace moe::test {

// body(i) for every i in [0, count), each on a thread of its own, started
// together (each waits until all have started), then joined: callers that
// really run at the same time.
template <class Body>
void run_together(std::size_t count, Body&& body) {
  std::latch start(static_cast<std::ptrdiff_t>(count));
  std::vector<std::thread> threads;
  for (std::size_t i = 0; i < count; ++i)
    threads.emplace_back([&, i] {
      start.arrive_and_wait();
      body(i);
    });
  for (auto& t : threads) t.join();
}

// Under AddressSanitizer a request for more memory than exists aborts in
// operator new (allocator_may_return_null covers only malloc): tests of a
// failed allocation run in the builds without it.
#if defined(__SANITIZE_ADDRESS__)
inline constexpr bool kAddressSanitizer = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
inline constexpr bool kAddressSanitizer = true;
#else
inline constexpr bool kAddressSanitizer = false;
#endif
#else
inline constexpr bool kAddressSanitizer = false;
#endif

template <class S>
using Mat = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

template <class S>
Mat<S> random_matrix(Index rows, Index cols, std::uint64_t seed, double scale = 1.0) {
  Mat<S> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i)
    m.data()[i] = static_cast<S>(scale * (2.0 * math::uniform01(seed, 7, i) - 1.0));
  return m;
}

// L(layer, x) = <R, y> + aux for a fresh copy of the layer, so that every
// evaluation sees the same state (dropout key, counters).
template <class Layer>
double loss(const Layer& layer, const Mat<double>& x, const Mat<double>& r, Mode mode) {
  Layer copy = layer;
  typename Layer::Cache cache;
  Mat<double> y(x.rows(), x.cols());
  copy.forward(x, y, cache, mode);
  return (r.array() * y.array()).sum() + cache.stats().aux_loss;
}

struct GradientReport {
  std::string block;
  double diff = 0;   // ||analytic - numeric||
  double scale = 0;  // max(||analytic||, ||numeric||)
  // Relative error, with an absolute floor for blocks whose true gradient is
  // ~0 (an expert without tokens): far below what any real bug produces.
  bool passes(double rel_tol = 1e-6, double abs_floor = 1e-9) const {
    return diff <= rel_tol * scale + abs_floor;
  }
  double relative() const { return scale > 0 ? diff / scale : diff; }
};

inline GradientReport compare(std::string block, const std::vector<double>& a,
                              const std::vector<double>& b) {
  double diff = 0, na = 0, nb = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    diff += (a[i] - b[i]) * (a[i] - b[i]);
    na += a[i] * a[i];
    nb += b[i] * b[i];
  }
  return {std::move(block), std::sqrt(diff), std::sqrt(std::max(na, nb))};
}

// Compares the layer's backward with central differences for dx and every
// named parameter tensor. Returns one report per block.
template <class Layer>
std::vector<GradientReport> check_gradients(const Layer& layer, const Mat<double>& x,
                                            const Mat<double>& r, Mode mode, double h = 1e-5) {
  Layer analytic = layer;
  typename Layer::Cache cache;
  Mat<double> y(x.rows(), x.cols()), dx(x.rows(), x.cols());
  analytic.forward(x, y, cache, mode);
  auto grads = analytic.make_gradients();
  analytic.backward(x, cache, r, dx, grads);

  std::vector<GradientReport> reports;
  {
    std::vector<double> a(dx.data(), dx.data() + dx.size()), n(a.size());
    Mat<double> xp = x;
    for (Index i = 0; i < x.size(); ++i) {
      const double keep = xp.data()[i];
      xp.data()[i] = keep + h;
      const double up = loss(layer, xp, r, mode);
      xp.data()[i] = keep - h;
      const double down = loss(layer, xp, r, mode);
      xp.data()[i] = keep;
      n[i] = (up - down) / (2 * h);
    }
    reports.push_back(compare("dx", a, n));
  }
  for (const auto& spec : layer.parameters().layout().specs()) {
    const auto g = grads[spec.name];
    std::vector<double> a(g.begin(), g.end()), n(a.size());
    if (!spec.trainable) {  // frozen: its gradient must be exactly zero, whatever FD says
      reports.push_back(compare(spec.name + " (frozen, must be 0)", a, n));
      continue;
    }
    Layer perturbed = layer;
    auto p = perturbed.parameters()[spec.name];
    for (std::size_t i = 0; i < p.size(); ++i) {
      const double keep = p[i];
      p[i] = keep + h;
      const double up = loss(perturbed, x, r, mode);
      p[i] = keep - h;
      const double down = loss(perturbed, x, r, mode);
      p[i] = keep;
      n[i] = (up - down) / (2 * h);
    }
    reports.push_back(compare(spec.name, a, n));
  }
  return reports;
}

// The CPU backend's GEMM engines this build has: Eigen, and the BLAS when
// the build found one.
inline std::vector<cpu::Gemm> gemm_engines() {
  std::vector<cpu::Gemm> engines{cpu::Gemm::eigen};
  if (cpu::blas::kAvailable) engines.push_back(cpu::Gemm::blas);
  return engines;
}

// Whether a and b hold the same values, bit for bit (a NaN equals itself,
// -0 differs from +0). Contiguous storage only: matrices, vectors, spans (a
// block of a matrix is compared as a Mat of its own).
template <class A, class B>
bool same_bits(const A& a, const B& b) {
  return a.size() == b.size() &&
         std::memcmp(a.data(), b.data(),
                     sizeof(a.data()[0]) * static_cast<std::size_t>(a.size())) == 0;
}

// ||got - want|| / ||want|| (Frobenius norms, in double).
template <class S>
double relative_norm(const Mat<S>& got, const Mat<S>& want) {
  return (got - want).template cast<double>().norm() / want.template cast<double>().norm();
}

// One training step (forward, then backward) of `layer` on x and dy, with a
// fresh cache.
template <class L, class S>
void training_step(L& layer, const Mat<S>& x, const Mat<S>& dy, Mat<S>& y, Mat<S>& dx,
                   TensorBuffer<S>& grads) {
  typename L::Cache cache;
  layer.forward(x, y, cache, Mode::train);
  layer.backward(x, cache, dy, dx, grads);
}

// y, dx and every parameter gradient of one training step, in one vector
// (to compare runs bitwise).
template <class L, class S>
std::vector<S> training_step_values(L& layer, const Mat<S>& x, const Mat<S>& dy) {
  Mat<S> y(x.rows(), x.cols()), dx(x.rows(), x.cols());
  auto grads = layer.make_gradients();
  training_step(layer, x, dy, y, dx, grads);
  std::vector<S> all(y.data(), y.data() + y.size());
  all.insert(all.end(), dx.data(), dx.data() + dx.size());
  all.insert(all.end(), grads.flat().begin(), grads.flat().end());
  return all;
}

// Each parameter's gradient in `got` within `tolerance` of want's, relative
// to its norm (plus `floor`, for gradients that are all but zero).
template <class S>
void check_gradients_close(const TensorBuffer<S>& got, const TensorBuffer<S>& want,
                           double tolerance, double floor) {
  for (const auto& spec : want.layout().specs()) {
    CAPTURE(spec.name);
    const auto a = got[spec.name], b = want[spec.name];
    double diff = 0, norm = 0;
    for (std::size_t i = 0; i < a.size(); ++i) {
      diff += std::pow(static_cast<double>(a[i]) - b[i], 2);
      norm += static_cast<double>(b[i]) * b[i];
    }
    CHECK(std::sqrt(diff) <= tolerance * std::sqrt(norm) + floor);
  }
}

// Caps the address space at what the process holds now plus `headroom`
// bytes, for a test that wants an allocation to fail; restores the limit
// when it ends. active() is false where the existing limit is already
// tighter (nothing changed).
class AddressSpaceLimit {
 public:
  explicit AddressSpaceLimit(std::uint64_t headroom) {
    std::uint64_t pages = 0;
    std::ifstream("/proc/self/statm") >> pages;
    if (pages == 0 || ::getrlimit(RLIMIT_AS, &saved_) != 0) return;
    rlimit tight = saved_;
    tight.rlim_cur = pages * static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE)) + headroom;
    if (saved_.rlim_cur != RLIM_INFINITY && tight.rlim_cur >= saved_.rlim_cur) return;
    active_ = ::setrlimit(RLIMIT_AS, &tight) == 0;
  }
  ~AddressSpaceLimit() {
    if (active_) ::setrlimit(RLIMIT_AS, &saved_);
  }
  AddressSpaceLimit(const AddressSpaceLimit&) = delete;
  AddressSpaceLimit& operator=(const AddressSpaceLimit&) = delete;
  bool active() const { return active_; }

 private:
  rlimit saved_{};
  bool active_ = false;
};

// GELU and SwiGLU with only the required functions (no fused
// value_and_derivative, no span functions): the layer's element-wise
// fallbacks.
struct PlainGELU {
  static constexpr bool kGated = false;
  static constexpr bool kSupportsBias = true;
  static constexpr const char* kName = "plain_gelu";
  template <class S>
  static S value(S u) {
    return math::gelu(u);
  }
  template <class S>
  static S derivative(S u) {
    return math::gelu_derivative(u);
  }
};
struct PlainSwiGLU {
  static constexpr bool kGated = true;
  static constexpr bool kSupportsBias = false;
  static constexpr const char* kName = "plain_swiglu";
  template <class S>
  static S value(S gate, S up) {
    return math::swiglu(gate, up);
  }
  template <class S>
  static void partials(S gate, S up, S& d_gate, S& d_up) {
    math::swiglu_partials(gate, up, d_gate, d_up);
  }
};
static_assert(ActivationPolicy<PlainGELU>);
static_assert(ActivationPolicy<PlainSwiGLU>);

}  // namespace moe::test
