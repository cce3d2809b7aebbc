// Expert parallelism over NCCL on the GPU: every case of cases.hpp with
// moe::nccl::ExpertParallel over a communicator of this process's one GPU
// (P = 1) must equal dispatch::Local bitwise: y, dx, gradients, state,
// statistics and the eval forward. The dispatcher's protocol (counts,
// capacity, pair indices, the reordering) is shared with the MPI transport
// and tested there at P = 2 and 4 (tests/mpi); this checks the NCCL
// transport and the CUDA backend's side of it.
//
// Without a CUDA device it exits 77, which CTest reports as skipped.

#include <cstdio>
#include <cstring>

#include "cases.hpp"
#include "moe/nccl.cuh"

int main() {
  if (moe::cuda::device_count() == 0) {
    std::printf("test_nccl: no CUDA device, skipped\n");
    return 77;
  }
  ncclComm_t comm;
  int device = 0;
  moe::nccl::check(ncclCommInitAll(&comm, 1, &device), "ncclCommInitAll");
  int failures = 0;
  {
    const moe::cuda::Backend<float> backend(0);
    const auto local = moe::gpu_test::run_cases(backend);
    const auto sharded = moe::gpu_test::run_cases(backend, moe::nccl::ExpertParallel(comm));
    for (std::size_t i = 0; i < local.size(); ++i) {
      const auto& a = local[i];
      const auto& b = sharded[i];
      const bool same = a.y == b.y && a.dx == b.dx && a.grads == b.grads && a.y_eval == b.y_eval &&
                        a.state == b.state && a.tokens_per_expert == b.tokens_per_expert &&
                        a.aux_loss == b.aux_loss && a.dropped == b.dropped;
      std::printf("%s  %s\n", same ? "ok  " : "FAIL", a.name.c_str());
      failures += same ? 0 : 1;
    }
    std::printf("%zu cases, %d failures\n", local.size(), failures);
  }
  ncclCommDestroy(comm);
  return failures == 0 ? 0 : 1;
}
