// Must NOT compile: moe::Layer with a router lacking every RouterPolicy member.
// The test expects the compiler to name the violated concept, RouterPolicy.
// With MOE_COMPILE_FAIL_CONTROL the same code uses a valid router and must
// compile, so the failure is known to come from the concept alone.
#include "moe/moe.hpp"

struct NotARouter {};

#ifdef MOE_COMPILE_FAIL_CONTROL
using RouterUnderTest = moe::router::TopK;
#else
using RouterUnderTest = NotARouter;
#endif

using L = moe::Layer<RouterUnderTest, moe::estimator::Sparse, moe::cpu::Backend<float>,
                     moe::act::GELU>;
static_assert(sizeof(L) > 0);

int main() { return 0; }
