// Processes that disagree end the job with the reason (MPI_Abort), never a
// hang: run under mpiexec with 2 processes; ctest expects the message.
//   construction  process 1 builds its layer with another seed
//   forward       process 1 runs an eval forward while process 0 trains

#include <mpi.h>

#include <Eigen/Core>
#include <cstdio>
#include <string>

#include "moe/moe.hpp"
#include "moe/mpi.hpp"

using namespace moe;
using Ep =
    Layer<router::TopK, estimator::Sparse, cpu::Backend<double>, act::GELU, mpi::ExpertParallel>;

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  const std::string what = argc > 1 ? argv[1] : "construction";
  const LayerConfig config{.d_model = 4, .d_ff = 3, .experts = 4};
  const std::uint64_t seed = what == "construction" && rank == 1 ? 8 : 7;
  Ep layer(config, router::TopK{.k = 2}, {}, seed, cpu::Backend<double>{},
           mpi::ExpertParallel(MPI_COMM_WORLD));
  Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> x(3, 4), y(3, 4);
  x.setConstant(0.5);
  Ep::Cache cache;
  layer.forward(x, y, cache, what == "forward" && rank == 1 ? Mode::eval : Mode::train);
  std::printf("rank %d: no mismatch was detected\n", rank);
  MPI_Finalize();
  return 0;
}
