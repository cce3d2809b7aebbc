#pragma once
// moe::mpi::ExpertParallel: the expert-parallel dispatch policy over an MPI
// communicator, for the CPU backend (docs/expert-parallel.md):
//
//   moe::Layer<Router, Estimator, moe::cpu::Backend<float>, moe::act::SwiGLU,
//              moe::mpi::ExpertParallel>
//       layer(config, router, estimator, seed, {}, moe::mpi::ExpertParallel(MPI_COMM_WORLD));

#include "moe/dispatch/expert_parallel.hpp"
#include "moe/mpi/transport.hpp"

namespace moe::mpi {

using ExpertParallel = dispatch::ExpertParallel<Transport>;

}  // namespace moe::mpi
