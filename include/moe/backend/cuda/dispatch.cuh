#pragma once
// The CUDA backend's dispatch: the pairs sorted by expert with CUB's radix
// sort (end_bit = ceil(log2 E); stable, so token order inside an expert),
// CUB's histogram and scans for the counts and offsets, and one kernel that
// applies the capacity and writes the permutation: the same rows as the CPU
// backend's counting sort.

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cub/device/device_histogram.cuh>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include "moe/backend/cuda/check.cuh"
#include "moe/backend/cuda/context.cuh"
#include "moe/backend/cuda/kernels.cuh"
#include "moe/backend/cuda/memory.cuh"
#include "moe/core/error.hpp"
#include "moe/core/routing.hpp"

namespace moe::cuda::detail {

// The pairs sorted by expert (stable: token order inside an expert), at most
// `capacity` per expert (capacity < 0: all); the same result as the CPU
// backend's counting sort.
template <class S, template <class> class Buffer>
void dispatch_pairs(Context& context, const Selection<S, Buffer>& sel, Index capacity,
                    Dispatch<Buffer>& out) {
  const Index E = sel.experts, P = sel.pairs(), tokens = sel.tokens;
  moe::detail::require(P <= Index{INT_MAX}, "moe::cuda::Backend::dispatch: ", P,
                       " pairs, expected at most INT_MAX (CUB's item count)");
  moe::detail::require(E >= 1 && E <= Index{INT_MAX}, "moe::cuda::Backend::dispatch: experts=", E,
                       ", expected 1 <= experts <= INT_MAX");
  context.activate();
  out.pair_token.resize(static_cast<std::size_t>(P));
  out.pair_row.resize(static_cast<std::size_t>(P));
  out.row_offsets.resize(static_cast<std::size_t>(E + 1));

  ScratchPlan plan;
  const auto pair_index_at = plan.add<Index>(P), sorted_pair_at = plan.add<Index>(P);
  const auto sorted_expert_at = plan.add<int>(P), counts_at = plan.add<int>(E);
  const auto start_at = plan.add<Index>(E), kept_at = plan.add<Index>(E);
  const auto widened_at = plan.add<Index>(E);
  int end_bit = 1;  // ceil(log2 E), at least one bit
  while ((Index{1} << end_bit) < E) ++end_bit;
  std::size_t sort_bytes = 0, histogram_bytes = 0, scan_bytes = 0;
  const int* keys = sel.pair_expert.data();
  check(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, keys, static_cast<int*>(nullptr),
                                        static_cast<const Index*>(nullptr),
                                        static_cast<Index*>(nullptr), static_cast<int>(P), 0,
                                        end_bit, context.stream),
        "cub::DeviceRadixSort::SortPairs (size)");
  check(cub::DeviceHistogram::HistogramEven(
            nullptr, histogram_bytes, keys, static_cast<int*>(nullptr), static_cast<int>(E + 1), 0,
            static_cast<int>(E), static_cast<int>(P), context.stream),
        "cub::DeviceHistogram::HistogramEven (size)");
  check(cub::DeviceScan::ExclusiveSum(nullptr, scan_bytes, static_cast<Index*>(nullptr),
                                      static_cast<Index*>(nullptr), static_cast<int>(E),
                                      context.stream),
        "cub::DeviceScan::ExclusiveSum (size)");
  const std::size_t temp_bytes = std::max({sort_bytes, histogram_bytes, scan_bytes});
  const auto temp_at = plan.add<char>(temp_bytes);
  void* base = context.scratch.reserve(plan.bytes());
  auto* pair_index = ScratchPlan::at<Index>(base, pair_index_at);
  auto* sorted_pair = ScratchPlan::at<Index>(base, sorted_pair_at);
  auto* sorted_expert = ScratchPlan::at<int>(base, sorted_expert_at);
  auto* counts = ScratchPlan::at<int>(base, counts_at);
  auto* sorted_start = ScratchPlan::at<Index>(base, start_at);
  auto* kept = ScratchPlan::at<Index>(base, kept_at);
  auto* widened = ScratchPlan::at<Index>(base, widened_at);
  void* temp = ScratchPlan::at<char>(base, temp_at);

  if (tokens > 0) {
    kernels::pair_tokens<<<context.blocks(tokens), kBlock, 0, context.stream>>>(
        sel.token_offsets.data(), tokens, out.pair_token.data(), pair_index);
    check_launch("moe::cuda::kernels::pair_tokens");
  }
  if (P > 0) {
    check(cub::DeviceRadixSort::SortPairs(temp, sort_bytes, keys, sorted_expert, pair_index,
                                          sorted_pair, static_cast<int>(P), 0, end_bit,
                                          context.stream),
          "cub::DeviceRadixSort::SortPairs");
  }
  check(cub::DeviceHistogram::HistogramEven(temp, histogram_bytes, keys, counts,
                                            static_cast<int>(E + 1), 0, static_cast<int>(E),
                                            static_cast<int>(P), context.stream),
        "cub::DeviceHistogram::HistogramEven");
  // Where each expert's pairs start in sorted order, and the rows it keeps.
  kernels::kept_counts<<<context.blocks(E), kBlock, 0, context.stream>>>(counts, E, Index{-1},
                                                                         widened);
  check_launch("moe::cuda::kernels::kept_counts");
  check(cub::DeviceScan::ExclusiveSum(temp, scan_bytes, widened, sorted_start, static_cast<int>(E),
                                      context.stream),
        "cub::DeviceScan::ExclusiveSum (sorted starts)");
  kernels::kept_counts<<<context.blocks(E), kBlock, 0, context.stream>>>(counts, E, capacity, kept);
  check_launch("moe::cuda::kernels::kept_counts");
  check(cudaMemsetAsync(out.row_offsets.data(), 0, sizeof(Index), context.stream),
        "cudaMemsetAsync");
  std::size_t inclusive_bytes = 0;
  check(cub::DeviceScan::InclusiveSum(nullptr, inclusive_bytes, kept, out.row_offsets.data() + 1,
                                      static_cast<int>(E), context.stream),
        "cub::DeviceScan::InclusiveSum (size)");
  moe::detail::require(inclusive_bytes <= temp_bytes, "moe::cuda::Backend::dispatch: CUB asks ",
                       inclusive_bytes, " bytes for a scan, expected at most ", temp_bytes);
  check(cub::DeviceScan::InclusiveSum(temp, inclusive_bytes, kept, out.row_offsets.data() + 1,
                                      static_cast<int>(E), context.stream),
        "cub::DeviceScan::InclusiveSum (row offsets)");

  // The host copies the GEMM launches need (the documented round trip).
  out.selected_per_expert.resize(static_cast<std::size_t>(E));
  out.rows_per_expert.resize(static_cast<std::size_t>(E));
  out.expert_offsets.resize(static_cast<std::size_t>(E + 1));
  copy_to_host(context, out.selected_per_expert.data(), widened, E);
  copy_to_host(context, out.rows_per_expert.data(), kept, E);
  copy_to_host(context, out.expert_offsets.data(), out.row_offsets.data(), E + 1);
  const Index rows = out.expert_offsets[static_cast<std::size_t>(E)];
  out.dropped = P - rows;

  out.row_pair.resize(static_cast<std::size_t>(rows));
  out.row_expert.resize(static_cast<std::size_t>(rows));
  out.row_token.resize(static_cast<std::size_t>(rows));
  if (P > 0) {
    kernels::place_pairs<<<context.blocks(P), kBlock, 0, context.stream>>>(
        sorted_expert, sorted_pair, P, sorted_start, kept, out.row_offsets.data(),
        out.pair_token.data(), out.pair_row.data(), out.row_pair.data(), out.row_expert.data(),
        out.row_token.data());
    check_launch("moe::cuda::kernels::place_pairs");
  }
  context.synchronize("cudaStreamSynchronize (dispatch)");
}

}  // namespace moe::cuda::detail
