#pragma once
// Expert parallelism over MPI (docs/expert-parallel.md): link moe::mpi.
//
//   moe::Layer<Router, Estimator, moe::cpu::Backend<float>, moe::act::SwiGLU,
//              moe::mpi::ExpertParallel>
//       layer(config, router, estimator, seed, {}, moe::mpi::ExpertParallel(MPI_COMM_WORLD));
//
// Checkpoints of such a layer (one file, loadable by one process):
// moe/mpi/checkpoint.hpp, which needs moe::io as well.

#include "moe/layer/replicated_gradients.hpp"
#include "moe/mpi/expert_parallel.hpp"
#include "moe/mpi/group.hpp"
#include "moe/mpi/transport.hpp"
