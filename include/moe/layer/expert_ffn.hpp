#pragma once
// The expert feed-forward blocks (docs/algorithms.md section 1), for every
// expert e over the rows dispatched to it:
//   pre = X W1_e (+ b1_e),  H = dropout(act(pre)),  out = H W2_e (+ b2_e)
// and their backward. Gated activations (SwiGLU) read pre as (gate, up) from
// a GEMM1 output twice as wide. Free functions over the backend and the
// activation; rows are laid out as a dispatch's experts' side.

#include <cstdint>

#include "moe/core/concepts.hpp"
#include "moe/core/routing.hpp"
#include "moe/core/tensor_buffer.hpp"
#include "moe/math/activation_span.hpp"
#include "moe/math/random.hpp"

namespace moe {

// GEMM1 output columns per hidden unit: gated activations read (gate, up).
template <class Activation>
inline constexpr Index kInputWidth = Activation::kGated ? 2 : 1;

// The experts' parameters (b1, b2 null without biases), in backend memory.
template <class S>
struct ExpertWeights {
  const S* w1;  // (E, d, w h), w = kInputWidth
  const S* b1;  // (E, h)
  const S* w2;  // (E, h, d)
  const S* b2;  // (E, d)
};
template <class S>
struct ExpertGradients {
  S* w1;
  S* b1;
  S* w2;
  S* b2;
};

// The expert tensors of a layer's parameters, or of its gradients.
template <class S>
ExpertWeights<S> expert_weights(const TensorBuffer<S>& params, bool bias) {
  return {params["experts.w1"].data(), bias ? params["experts.b1"].data() : nullptr,
          params["experts.w2"].data(), bias ? params["experts.b2"].data() : nullptr};
}
template <class S>
ExpertGradients<S> expert_gradients(TensorBuffer<S>& grads, bool bias) {
  return {grads["experts.w1"].data(), bias ? grads["experts.b1"].data() : nullptr,
          grads["experts.w2"].data(), bias ? grads["experts.b2"].data() : nullptr};
}

// Dropout on the hidden units: unit j of pair p is kept with probability
// 1 - rate, a pure function of (key, p, j), so the backward recomputes the
// forward's mask exactly. rate = 0: no dropout.
struct Dropout {
  double rate = 0;
  std::uint64_t key = 0;
  MOE_HOST_DEVICE bool keeps(Index pair, Index j) const {
    return math::uniform01(key, static_cast<std::uint64_t>(pair), static_cast<std::uint64_t>(j)) >=
           rate;
  }
  template <class S>
  MOE_HOST_DEVICE S keep_scale() const {
    return static_cast<S>(rate > 0 ? 1.0 / (1.0 - rate) : 1.0);
  }
};

// What the experts' forward keeps for their backward.
template <class B>
struct ExpertActivations {
  // (rows, w h) GEMM1 output + b1; after a training forward, the activation's
  // derivative (the partials of a gated one) times the dropout factor.
  typename B::template Buffer<typename B::Scalar> pre;
  typename B::template Buffer<typename B::Scalar> hidden;  // (rows, h) after dropout
  bool derivatives = false;                                // pre holds derivatives
  Dropout dropout;
};

// The experts' backward scratch.
template <class B>
struct ExpertScratch {
  typename B::template Buffer<typename B::Scalar> d_hidden, d_pre;
};

namespace detail {

// An activation's value and derivative (partials) in one call, from the
// policy's fused function where it has one (see ActivationPolicy).
template <class A, class S>
MOE_HOST_DEVICE S value_and_derivative(S u, S& derivative) {
  if constexpr (requires { A::value_and_derivative(u, derivative); }) {
    return A::value_and_derivative(u, derivative);
  } else {
    derivative = A::derivative(u);
    return A::value(u);
  }
}
template <class A, class S>
MOE_HOST_DEVICE S value_and_partials(S gate, S up, S& d_gate, S& d_up) {
  if constexpr (requires { A::value_and_partials(gate, up, d_gate, d_up); }) {
    return A::value_and_partials(gate, up, d_gate, d_up);
  } else {
    A::partials(gate, up, d_gate, d_up);
    return A::value(gate, up);
  }
}

// Columns [begin, end) of one row: hidden = act(pre), pre as (gate, up) for a
// gated activation; with derivatives, pre becomes the derivative (partials).
// Through the policy's span functions where it has them (vectorised on the
// CPU), else element by element. (Lanes: see moe/math/activation_span.hpp.)
template <class A, class S, int Lanes = math::kActivationLanes>
MOE_HOST_DEVICE void activate_columns(S* pre, S* hidden, Index h, Index begin, Index end,
                                      bool derivatives) {
  S* u = pre + begin;
  S* v = hidden + begin;
  const Index n = end - begin;
  if constexpr (A::kGated) {
    S* up = pre + h + begin;
    if (derivatives) {
      if constexpr (requires { A::value_and_partials_span(u, up, v, n); }) {
        A::value_and_partials_span(u, up, v, n);
      } else {
        for (Index j = 0; j < n; ++j) {
          S d_gate, d_up;
          v[j] = value_and_partials<A>(u[j], up[j], d_gate, d_up);
          u[j] = d_gate;
          up[j] = d_up;
        }
      }
    } else if constexpr (requires { A::value_span(u, up, v, n); }) {
      A::value_span(u, up, v, n);
    } else {
      for (Index j = 0; j < n; ++j) v[j] = A::value(u[j], up[j]);
    }
  } else {
    if (derivatives) {
      if constexpr (requires { A::value_and_derivative_span(u, v, n); }) {
        A::value_and_derivative_span(u, v, n);
      } else {
        for (Index j = 0; j < n; ++j) {
          S derivative;
          v[j] = value_and_derivative<A>(u[j], derivative);
          u[j] = derivative;
        }
      }
    } else if constexpr (requires { A::value_span(u, v, n); }) {
      A::value_span(u, v, n);
    } else {
      for (Index j = 0; j < n; ++j) v[j] = A::value(u[j]);
    }
  }
}

// rows (n, cols) += bias of each row's expert (E, cols).
template <class B, class S>
void add_row_bias(const B& be, const Dispatch<B::template Buffer>& rows, Index cols, const S* bias,
                  S* out) {
  const int* row_expert = rows.row_expert.data();
  be.parallel_for_rows(
      rows.rows(), cols,
      [=] MOE_HOST_DEVICE(Index r, Index begin, Index end) {
        const S* b = bias + row_expert[r] * cols;
        for (Index j = begin; j < end; ++j) out[r * cols + j] += b[j];
      },
      rows.rows() * cols);
}

// db_e += sum over expert e's rows of src (rows, n): per expert and column,
// in row order.
template <class B, class S>
void add_column_sums(const B& be, const Dispatch<B::template Buffer>& rows, const S* src, Index n,
                     S* db) {
  const Index* offsets = rows.row_offsets.data();
  be.parallel_for_rows(
      static_cast<Index>(rows.expert_offsets.size()) - 1, n,
      [=] MOE_HOST_DEVICE(Index e, Index begin, Index end) {
        S* out = db + e * n;
        for (Index r = offsets[e]; r < offsets[e + 1]; ++r)
          for (Index j = begin; j < end; ++j) out[j] += src[r * n + j];
      },
      rows.rows() * n);
}

// One pass over each hidden row: pre += b1 (b1 null: none), then
// hidden = dropout(act(pre)). With derivatives, pre becomes the derivative
// (partials) times the dropout factor, so that the backward is one
// multiplication: no transcendental and no mask recomputed.
template <class A, class B>
void activate(const B& be, const Dispatch<B::template Buffer>& rows, Index h,
              const typename B::Scalar* b1, ExpertActivations<B>& acts) {
  using S = typename B::Scalar;
  constexpr Index wide_factor = kInputWidth<A>;
  const Index wide = wide_factor * h;
  S* pre = acts.pre.data();
  S* hidden = acts.hidden.data();
  const int* row_expert = rows.row_expert.data();
  const Index* row_pair = rows.row_pair.data();
  const Dropout dropout = acts.dropout;
  const S keep_scale = dropout.keep_scale<S>();
  const bool derivatives = acts.derivatives;
  be.parallel_for_rows(
      rows.rows(), h,
      [=] MOE_HOST_DEVICE(Index r, Index begin, Index end) {
        S* pr = pre + r * wide;
        S* hr = hidden + r * h;
        if (b1 != nullptr) {
          const S* b = b1 + row_expert[r] * h;
          for (Index j = begin; j < end; ++j) pr[j] += b[j];
        }
        // Value (and derivative in place); the dropout factor, when there is
        // one, in a second loop, so the first has no branch per element.
        activate_columns<A>(pr, hr, h, begin, end, derivatives);
        if (derivatives) {
          if (dropout.rate > 0) {  // the dropout factor, on the value and the derivative
            for (Index j = begin; j < end; ++j) {
              const S m = dropout.keeps(row_pair[r], j) ? keep_scale : S(0);
              hr[j] *= m;
              pr[j] *= m;
              if constexpr (A::kGated) pr[h + j] *= m;
            }
          }
          return;
        }
        if (dropout.rate > 0) {
          for (Index j = begin; j < end; ++j)
            hr[j] *= dropout.keeps(row_pair[r], j) ? keep_scale : S(0);
        }
      },
      rows.rows() * wide * 8);
}

// d_pre = d_hidden * act'(pre) (the mask and 1 / (1 - rate) included).
template <class A, class B>
void activation_backward(const B& be, const Dispatch<B::template Buffer>& rows, Index h,
                         const ExpertActivations<B>& acts, const typename B::Scalar* d_hidden,
                         typename B::Scalar* d_pre) {
  using S = typename B::Scalar;
  constexpr Index wide_factor = kInputWidth<A>;
  const Index wide = wide_factor * h;
  const S* pre = acts.pre.data();
  const Index* row_pair = rows.row_pair.data();
  const Dropout dropout = acts.dropout;
  const S keep_scale = dropout.keep_scale<S>();
  const bool derivatives = acts.derivatives;
  be.parallel_for_rows(
      rows.rows(), h,
      [=] MOE_HOST_DEVICE(Index r, Index begin, Index end) {
        const S* pr = pre + r * wide;
        const S* dhr = d_hidden + r * h;
        S* dpr = d_pre + r * wide;
        if (derivatives) {  // pre holds the forward's derivatives (dropout included)
          for (Index j = begin; j < end; ++j) {
            dpr[j] = dhr[j] * pr[j];
            if constexpr (A::kGated) dpr[h + j] = dhr[j] * pr[h + j];
          }
          return;
        }
        for (Index j = begin; j < end; ++j) {
          S dh = dhr[j];
          if (dropout.rate > 0) dh *= dropout.keeps(row_pair[r], j) ? keep_scale : S(0);
          if constexpr (A::kGated) {
            S d_gate, d_up;
            A::partials(pr[j], pr[h + j], d_gate, d_up);
            dpr[j] = dh * d_gate;
            dpr[h + j] = dh * d_up;
          } else {
            dpr[j] = dh * A::derivative(pr[j]);
          }
        }
      },
      rows.rows() * wide * 2);
}

}  // namespace detail

// out (rows, d) = the experts' outputs on x (rows, d). acts.dropout and
// acts.derivatives say how to run (set by the caller); acts keeps what the
// backward needs.
template <class Activation, class B>
void expert_forward(const B& be, const Dispatch<B::template Buffer>& rows, Index d, Index h,
                    const ExpertWeights<typename B::Scalar>& w, const typename B::Scalar* x,
                    ExpertActivations<B>& acts, typename B::Scalar* out) {
  using S = typename B::Scalar;
  const Index wide = kInputWidth<Activation> * h;
  acts.pre.resize(static_cast<std::size_t>(rows.rows() * wide));
  acts.hidden.resize(static_cast<std::size_t>(rows.rows() * h));
  const auto& offsets = rows.expert_offsets;
  be.grouped_gemm(offsets, false, wide, d, x, w.w1, d * wide, S(0), acts.pre.data());
  detail::activate<Activation>(be, rows, h, w.b1, acts);
  be.grouped_gemm(offsets, false, d, h, acts.hidden.data(), w.w2, h * d, S(0), out);
  if (w.b2 != nullptr) detail::add_row_bias(be, rows, d, w.b2, out);
}

// From d_out (rows, d): d_x (rows, d) = dL/dx of each row, and the weight
// gradients accumulated into g.
template <class Activation, class B>
void expert_backward(const B& be, const Dispatch<B::template Buffer>& rows, Index d, Index h,
                     const ExpertWeights<typename B::Scalar>& w, const typename B::Scalar* x,
                     const ExpertActivations<B>& acts, const typename B::Scalar* d_out,
                     ExpertScratch<B>& scratch, const ExpertGradients<typename B::Scalar>& g,
                     typename B::Scalar* d_x) {
  using S = typename B::Scalar;
  const Index wide = kInputWidth<Activation> * h;
  scratch.d_hidden.resize(static_cast<std::size_t>(rows.rows() * h));
  scratch.d_pre.resize(static_cast<std::size_t>(rows.rows() * wide));
  S* d_hidden = scratch.d_hidden.data();
  S* d_pre = scratch.d_pre.data();
  const auto& offsets = rows.expert_offsets;
  be.grouped_gemm(offsets, true, h, d, d_out, w.w2, h * d, S(0), d_hidden);   // dH = dO W2^T
  be.grouped_gemm_tn(offsets, h, d, acts.hidden.data(), d_out, g.w2, h * d);  // dW2 += H^T dO
  if (g.b2 != nullptr) detail::add_column_sums(be, rows, d_out, d, g.b2);
  detail::activation_backward<Activation>(be, rows, h, acts, d_hidden, d_pre);
  be.grouped_gemm_tn(offsets, d, wide, x, d_pre, g.w1, d * wide);  // dW1 += X^T dPre
  if (g.b1 != nullptr) detail::add_column_sums(be, rows, d_pre, h, g.b1);
  be.grouped_gemm(offsets, true, d, wide, d_pre, w.w1, d * wide, S(0), d_x);  // dX = dPre W1^T
}

}  // namespace moe
