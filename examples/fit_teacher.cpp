// The smallest complete use of moe: a student MoE layer learns to reproduce a
// fixed random "teacher" MoE layer from samples, with the student's own
// backward and AdamW. The printed loss falls by orders of magnitude.
//
//   moe-fit-teacher [steps]

#include <Eigen/Core>
#include <cstdio>
#include <cstdlib>
#include <moe/moe.hpp>
#include <string>

using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MoE = moe::Layer<moe::router::TopK, moe::estimator::Sparse, moe::cpu::Backend<float>,
                       moe::act::SwiGLU>;

int main(int argc, char** argv) {
  const int steps = argc > 1 ? std::atoi(argv[1]) : 2000;
  const moe::LayerConfig config{.d_model = 32, .d_ff = 64, .experts = 8};
  MoE teacher(config, moe::router::TopK{.k = 2}, {}, /*seed=*/1);
  for (auto& w : teacher.parameters().flat()) w *= 4.0f;  // a teacher with visible outputs
  MoE student(config, moe::router::TopK{.k = 2, .aux_coef = 0.01}, {}, /*seed=*/2);
  moe::optim::AdamW optimizer({.lr = 1e-2});

  const moe::Index batch = 256;
  Matrix x(batch, config.d_model), target(batch, config.d_model), y(batch, config.d_model);
  Matrix dy(batch, config.d_model), dx(batch, config.d_model);
  MoE::Cache teacher_cache, cache;
  auto grads = student.make_gradients();
  std::printf("step  relative mse  aux     tokens per expert\n");
  for (int step = 0; step <= steps; ++step) {
    x.setRandom();  // a fresh batch each step
    teacher.forward(x, target, teacher_cache, moe::Mode::eval);
    student.forward(x, y, cache, moe::Mode::train);
    // L = mean squared error + aux; dL/dy = 2 (y - target) / (T d).
    dy = (y - target) * (2.0f / static_cast<float>(y.size()));
    const double relative_mse = (y - target).squaredNorm() / target.squaredNorm();
    grads.set_zero();
    student.backward(x, cache, dy, dx, grads);
    optimizer.step(student.parameters(), grads);
    if (step % (steps / 10 > 0 ? steps / 10 : 1) == 0) {
      std::string load;
      for (auto n : cache.stats().tokens_per_expert) load += std::to_string(n) + " ";
      std::printf("%4d  %.3e     %.4f  %s\n", step, relative_mse, cache.stats().aux_loss,
                  load.c_str());
    }
  }
  return 0;
}
