#pragma once
// The small non-MoE pieces of the language model, each with its hand-written
// backward (finite-difference checked in tests/test_train_lm.cpp):
//   context embedding  x_t = sum_{j=1..n} W_j[c_{t-j}]      (Bengio et al. 2003)
//   RMSNorm            y = g * x / sqrt(mean(x^2) + eps)     (Zhang & Sennrich 2019)
//   softmax head + CE  L = mean_t (logsumexp(W h_t + b) - (W h_t + b)_{y_t})
// Shapes are (tokens, features), row-major, like the library's.

#include <Eigen/Core>
#include <cmath>
#include <span>
#include <vector>

namespace train_lm {

template <class T>
using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;

// A batch: for each row t, the n previous character ids (nearest first) and
// the id to predict.
struct Batch {
  int context = 0;
  std::vector<int> history;  // (T, n): history[t n + j] = c_{t-1-j}
  std::vector<int> targets;  // (T)
  Eigen::Index rows() const { return static_cast<Eigen::Index>(targets.size()); }
};

// n position-specific tables (n, V, d): the one-hot window times one matrix,
// computed as n row lookups.
template <class T>
struct ContextEmbedding {
  static void forward(std::span<const T> table, int vocab, const Batch& batch, Matrix<T>& x) {
    const Eigen::Index d = x.cols();
    x.setZero();
    for (Eigen::Index t = 0; t < batch.rows(); ++t)
      for (int j = 0; j < batch.context; ++j) {
        const int c = batch.history[static_cast<std::size_t>(t * batch.context + j)];
        const T* row = table.data() + (static_cast<Eigen::Index>(j) * vocab + c) * d;
        for (Eigen::Index q = 0; q < d; ++q) x(t, q) += row[q];
      }
  }
  // dtable += scatter of dx (a character seen twice gets both rows' sums).
  static void backward(std::span<T> dtable, int vocab, const Batch& batch, const Matrix<T>& dx) {
    const Eigen::Index d = dx.cols();
    for (Eigen::Index t = 0; t < batch.rows(); ++t)
      for (int j = 0; j < batch.context; ++j) {
        const int c = batch.history[static_cast<std::size_t>(t * batch.context + j)];
        T* row = dtable.data() + (static_cast<Eigen::Index>(j) * vocab + c) * d;
        for (Eigen::Index q = 0; q < d; ++q) row[q] += dx(t, q);
      }
  }
};

template <class T>
struct RMSNorm {
  static constexpr double kEps = 1e-6;

  // inv_rms (T) is kept for the backward.
  static void forward(const Matrix<T>& x, std::span<const T> gain, Matrix<T>& y,
                      Vector<T>& inv_rms) {
    const Eigen::Index d = x.cols();
    inv_rms.resize(x.rows());
    for (Eigen::Index t = 0; t < x.rows(); ++t) {
      const double mean_square =
          static_cast<double>(x.row(t).squaredNorm()) / static_cast<double>(d);
      inv_rms(t) = static_cast<T>(1.0 / std::sqrt(mean_square + kEps));
      for (Eigen::Index q = 0; q < d; ++q) y(t, q) = gain[q] * x(t, q) * inv_rms(t);
    }
  }
  // With xhat = x r: dg += sum_t dy xhat, dx = r (dxhat - xhat mean(dxhat xhat)),
  // dxhat = dy g. dx is overwritten.
  static void backward(const Matrix<T>& x, std::span<const T> gain, const Vector<T>& inv_rms,
                       const Matrix<T>& dy, Matrix<T>& dx, std::span<T> dgain) {
    const Eigen::Index d = x.cols();
    for (Eigen::Index t = 0; t < x.rows(); ++t) {
      const T r = inv_rms(t);
      double dot = 0;
      for (Eigen::Index q = 0; q < d; ++q) {
        const T xhat = x(t, q) * r;
        dgain[q] += dy(t, q) * xhat;
        dot += static_cast<double>(dy(t, q) * gain[q] * xhat);
      }
      const T mean_dot = static_cast<T>(dot / static_cast<double>(d));
      for (Eigen::Index q = 0; q < d; ++q)
        dx(t, q) = r * (dy(t, q) * gain[q] - x(t, q) * r * mean_dot);
    }
  }
};

// logits = h W^T + b with W (V, d); the loss is the mean cross-entropy. The
// forward keeps the softmax probabilities for the backward.
template <class T>
struct SoftmaxCrossEntropyHead {
  static double forward(const Matrix<T>& h, const Eigen::Map<const Matrix<T>>& weight,
                        std::span<const T> bias, const std::vector<int>& targets,
                        Matrix<T>& probs) {
    probs.noalias() = h * weight.transpose();
    double loss = 0;
    for (Eigen::Index t = 0; t < probs.rows(); ++t) {
      auto row = probs.row(t);
      for (Eigen::Index v = 0; v < row.size(); ++v) row(v) += bias[static_cast<std::size_t>(v)];
      const T max = row.maxCoeff();
      const double z_target = static_cast<double>(row(targets[static_cast<std::size_t>(t)]) - max);
      double sum = 0;
      for (Eigen::Index v = 0; v < row.size(); ++v) {
        row(v) = static_cast<T>(std::exp(static_cast<double>(row(v) - max)));
        sum += static_cast<double>(row(v));
      }
      // log-sum-exp from the logit, not log(p): p may underflow in float.
      loss += std::log(sum) - z_target;
      row /= static_cast<T>(sum);
    }
    return loss / static_cast<double>(probs.rows());
  }
  // dlogits = (p - onehot) / T; dW += dlogits^T h; db += sum dlogits; dh = dlogits W.
  // probs is consumed (becomes dlogits). T is the loss's token count: these
  // rows, or a whole batch of which these rows are one process's share.
  static void backward(const Matrix<T>& h, const Eigen::Map<const Matrix<T>>& weight,
                       const std::vector<int>& targets, Matrix<T>& probs,
                       Eigen::Map<Matrix<T>> dweight, std::span<T> dbias, Matrix<T>& dh,
                       Eigen::Index loss_tokens) {
    const T inv_tokens = T(1) / static_cast<T>(loss_tokens);
    for (Eigen::Index t = 0; t < probs.rows(); ++t)
      probs(t, targets[static_cast<std::size_t>(t)]) -= T(1);
    probs *= inv_tokens;
    dweight.noalias() += probs.transpose() * h;
    for (Eigen::Index v = 0; v < probs.cols(); ++v)
      dbias[static_cast<std::size_t>(v)] += probs.col(v).sum();
    dh.noalias() = probs * weight;
  }
};

}  // namespace train_lm
