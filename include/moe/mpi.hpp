#pragma once
// Expert parallelism over MPI (docs/expert-parallel.md): link moe::mpi.
//
//   moe::mpi::ExpertParallel ep(MPI_COMM_WORLD);
//   moe::Layer<Router, Estimator, moe::cpu::Backend<float>, moe::act::SwiGLU,
//              moe::mpi::ExpertParallel> layer(config, {}, {}, seed, {}, ep);
//
// Checkpoints of such a layer (one file, loadable by one process):
// moe/mpi/checkpoint.hpp, which needs moe::io as well.

#include "moe/mpi/expert_parallel.hpp"
#include "moe/mpi/gradients.hpp"
#include "moe/mpi/group.hpp"
