// Must NOT compile: moe::Layer with an activation lacking the ActivationPolicy
// members (no kSupportsBias, kName, value or derivative). The test expects the
// compiler to name the violated concept, ActivationPolicy. With
// MOE_COMPILE_FAIL_CONTROL the same code uses a valid activation and must compile.
#include "moe/moe.hpp"

struct NotAnActivation {
  static constexpr bool kGated = false;
};

#ifdef MOE_COMPILE_FAIL_CONTROL
using ActivationUnderTest = moe::act::GELU;
#else
using ActivationUnderTest = NotAnActivation;
#endif

using L = moe::Layer<moe::router::TopK, moe::estimator::Sparse, moe::cpu::Backend<float>,
                     ActivationUnderTest>;
static_assert(sizeof(L) > 0);

int main() { return 0; }
