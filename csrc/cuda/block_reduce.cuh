// Deterministic block-wide sum shared by the CUDA kernels (fixed-order shared-memory tree,
// no atomics). Device code only; include from .cu files.
#pragma once

namespace kdfast {
namespace cuda {

constexpr int kBlockThreads = 256;

// Sum of v over the kBlockThreads threads of the block; every thread must call it and gets
// the total.
template <typename Acc>
__device__ Acc block_sum(Acc v) {
  __shared__ Acc partial[kBlockThreads];
  partial[threadIdx.x] = v;
  __syncthreads();
  for (int half = kBlockThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
    __syncthreads();
  }
  const Acc total = partial[0];
  __syncthreads();
  return total;
}

}  // namespace cuda
}  // namespace kdfast
