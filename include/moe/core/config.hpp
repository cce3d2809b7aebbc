#pragma once
// Basic vocabulary shared by every part of the library: index type, modes, the
// host/device annotation of the shared math, and the layer's shape.

#include <cstdint>

#if defined(__CUDACC__)
#define MOE_HOST_DEVICE __host__ __device__
#else
#define MOE_HOST_DEVICE
#endif

namespace moe {

using Index = std::int64_t;

// Train mode runs dropout and the policies' training-only state updates;
// eval mode is deterministic inference.
enum class Mode { train, eval };

// The shape and the runtime options of one MoE layer. Hyperparameters of the
// router and estimator live in those policy objects, not here.
struct LayerConfig {
  Index d_model = 0;             // width of x and y
  Index d_ff = 0;                // hidden width of one expert
  Index experts = 0;             // E
  bool expert_bias = false;      // b1, b2 in the expert FFN (ReLU/GELU only)
  double dropout = 0.0;          // on the expert hidden activation, train mode only
  double capacity_factor = 0.0;  // 0: dropless; else ceil(c*T*k/E) pairs per expert
  bool check_finite = false;     // reject NaN/Inf in x and dy with moe::Error
};

}  // namespace moe
