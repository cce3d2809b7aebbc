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
  return run_cases(cuda::Backend<T>(0));
}

}  // namespace

std::vector<Outcome> run_on_cuda(bool bf16) {
  return bf16 ? run_all<__nv_bfloat16>() : run_all<float>();
}

std::vector<std::vector<float>> serial_and_concurrent_eval_on_cuda(bool bf16) {
  return bf16 ? serial_and_concurrent_eval(cuda::Backend<__nv_bfloat16>(0))
              : serial_and_concurrent_eval(cuda::Backend<float>(0));
}

}  // namespace moe::gpu_test
