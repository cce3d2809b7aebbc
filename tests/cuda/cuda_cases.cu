// The GPU side of the suite: every case of cases.hpp on moe::cuda::Backend,
// fp32 and bf16 experts. Compiled by nvcc for every configured architecture
// (CI type-checks the backend with it); runs only where a GPU exists.

#include "cases.hpp"
#include "moe/cuda.cuh"

namespace moe::gpu_test {

int cuda_devices() { return cuda::device_count(); }

namespace {

template <class T>
std::vector<Outcome> run_all() {
  const cuda::Backend<T> backend(0);
  std::vector<Outcome> outcomes;
  for_each_case([&](const char* name, const Shape& shape, auto router, auto estimator, auto act,
                    const std::vector<int>& previous) {
    using Activation = decltype(act);
    outcomes.push_back(
        run<Activation>(name, backend, shape, std::move(router), std::move(estimator), previous));
  });
  return outcomes;
}

}  // namespace

std::vector<Outcome> run_on_cuda(bool bf16) {
  return bf16 ? run_all<__nv_bfloat16>() : run_all<float>();
}

}  // namespace moe::gpu_test
