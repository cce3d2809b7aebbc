#pragma once
// The CUDA backend's kernels: the loop primitives (one index, one column of a
// row, or one warp's sum per item), the finite check, the bf16 conversion and
// the dispatch's steps. Grid-stride throughout, so any grid covers any size.

#include <cuda_runtime.h>

#include <type_traits>

#include "moe/core/config.hpp"

namespace moe::cuda {

namespace kernels {

// Kernels are templates (on their element types): a header's non-template
// __global__ function would be defined again in every .cu file including it.

template <class F>
__global__ void for_each_index(Index n, F f) {
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index i = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    f(i);
}

// f(r, c, c + 1) for every (r, c): threadIdx.x runs along a row's columns, so
// a warp reads and writes neighbouring values of one row (coalesced), and
// threadIdx.y takes one row each. Grid-stride in both directions.
template <class F>
__global__ void for_each_row_column(Index rows, Index cols, F f) {
  const Index column_stride = static_cast<Index>(gridDim.x) * blockDim.x;
  const Index row_stride = static_cast<Index>(gridDim.y) * blockDim.y;
  for (Index r = static_cast<Index>(blockIdx.y) * blockDim.y + threadIdx.y; r < rows;
       r += row_stride)
    for (Index c = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; c < cols;
         c += column_stride)
      f(r, c, c + 1);
}

// store(i, sum_j term(i, j)): one warp per i, its lanes striding over j, then
// a shuffle tree. Every lane of a warp runs the same i (the loop bound is
// uniform per warp), so the full mask is right.
template <class Term, class Store>
__global__ void sum_rows(Index n, Index len, Term term, Store store) {
  using Sum = std::decay_t<decltype(term(Index{}, Index{}))>;
  constexpr int kWarp = 32;
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const Index warps = static_cast<Index>(gridDim.x) * (blockDim.x / kWarp);
  for (Index i = (static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp; i < n;
       i += warps) {
    Sum sum = 0;
    for (Index j = lane; j < len; j += kWarp) sum += term(i, j);
    for (int offset = kWarp / 2; offset > 0; offset /= 2)
      sum += __shfl_down_sync(0xffffffffu, sum, offset);
    if (lane == 0) store(i, sum);
  }
}

// The smallest i with a NaN or Inf (v - v is 0 for every finite v only).
template <class S>
__global__ void first_non_finite(const S* p, Index n, unsigned long long* first) {
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index i = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    if (!(p[i] - p[i] == S(0))) atomicMin(first, static_cast<unsigned long long>(i));
}

template <class To>
__global__ void convert(const float* src, Index n, To* dst) {
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index i = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    dst[i] = static_cast<To>(src[i]);
}

// pair_token[p] = t for the pairs of token t; pair_index[p] = p (sort values).
template <class I>
__global__ void pair_tokens(const I* token_offsets, I tokens, I* pair_token, I* pair_index) {
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index t = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; t < tokens; t += stride)
    for (Index p = token_offsets[t]; p < token_offsets[t + 1]; ++p) {
      pair_token[p] = t;
      pair_index[p] = p;
    }
}

// Pairs each expert keeps: all, or its first `capacity` in token order.
template <class I>
__global__ void kept_counts(const int* counts, I experts, I capacity, I* kept) {
  const I stride = static_cast<I>(gridDim.x) * blockDim.x;
  for (I e = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; e < experts; e += stride) {
    const I n = counts[e];
    kept[e] = capacity < 0 || n < capacity ? n : capacity;
  }
}

// From the pairs sorted by expert: the rank of each pair inside its expert
// decides whether it is kept, and then its row.
template <class I>
__global__ void place_pairs(const int* sorted_expert, const I* sorted_pair, I pairs,
                            const I* sorted_start, const I* kept, const I* row_offsets,
                            const I* pair_token, I* pair_row, I* row_pair, int* row_expert,
                            I* row_token) {
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index s = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; s < pairs;
       s += stride) {
    const int e = sorted_expert[s];
    const Index p = sorted_pair[s];
    const Index rank = s - sorted_start[e];
    if (rank < kept[e]) {
      const Index row = row_offsets[e] + rank;
      pair_row[p] = row;
      row_pair[row] = p;
      row_expert[row] = e;
      row_token[row] = pair_token[p];
    } else {
      pair_row[p] = -1;
    }
  }
}

}  // namespace kernels

}  // namespace moe::cuda
