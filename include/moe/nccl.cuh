#pragma once
// Expert parallelism over NCCL for the CUDA backend (docs/expert-parallel.md):
// link moe::nccl. The communicator is the caller's (ncclCommInitRank):
//
//   moe::Layer<Router, Estimator, moe::cuda::Backend<float>, moe::act::SwiGLU,
//              moe::nccl::ExpertParallel>
//       layer(config, router, estimator, seed, backend, moe::nccl::ExpertParallel(comm));
//
// Replicated gradients: moe::sum_replicated_gradients (moe/layer/replicated_gradients.hpp).

#include "moe/cuda.cuh"
#include "moe/dispatch/expert_parallel.hpp"
#include "moe/nccl/group.cuh"
#include "moe/nccl/transport.cuh"

namespace moe::nccl {

using ExpertParallel = dispatch::ExpertParallel<Transport>;

}  // namespace moe::nccl
