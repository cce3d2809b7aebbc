#pragma once
// moe on the GPU: the layer, every policy and the CUDA backend. Needs nvcc
// with --extended-lambda (the moe::cuda CMake target adds it); the CPU
// backend (Eigen) is not included, so this header never reaches Eigen.

#include "moe/backend/cuda/backend.cuh"
#include "moe/common.hpp"

namespace moe {

static_assert(RouterPolicy<router::TopK, cuda::Backend<float>>);
static_assert(EstimatorPolicy<estimator::DefaultEMA, cuda::Backend<__nv_bfloat16>>);

}  // namespace moe
