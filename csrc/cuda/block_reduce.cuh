// Deterministic block-wide sum shared by the CUDA kernels (fixed-order shared-memory tree,
// no atomics). Device code only; include from .cu files.
#pragma once

namespace kdfast {
namespace cuda {

constexpr int kBlockThreads = 256;

// combine(v) over the kBlockThreads threads of the block in a fixed-order shared-memory
// tree; every thread must call it and gets the result.
template <typename Acc, typename Combine>
__device__ Acc block_reduce(Acc v, Combine combine) {
  __shared__ Acc partial[kBlockThreads];
  partial[threadIdx.x] = v;
  __syncthreads();
  for (int half = kBlockThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) {
      partial[threadIdx.x] = combine(partial[threadIdx.x], partial[threadIdx.x + half]);
    }
    __syncthreads();
  }
  const Acc total = partial[0];
  __syncthreads();
  return total;
}

struct Plus {
  template <typename Acc>
  __device__ Acc operator()(Acc a, Acc b) const { return a + b; }
};

struct Larger {
  template <typename Acc>
  __device__ Acc operator()(Acc a, Acc b) const { return b > a ? b : a; }
};

// Sum of v over the block; every thread gets the total.
template <typename Acc>
__device__ Acc block_sum(Acc v) { return block_reduce(v, Plus()); }

// Largest v over the block (v >= 0, no NaN); called like block_sum.
template <typename Acc>
__device__ Acc block_max(Acc v) { return block_reduce(v, Larger()); }

// ||row||_2 over n values by the block, finite for finite values (kdfast::norm_from_sum_sq's
// rule: where the plain sum of squares overflows, it is redone on row * 2^-e,
// e = ilogb(max |row|), and the root scaled back). The branch is uniform over the block.
template <typename Acc>
__device__ Acc block_norm(const Acc* row, int64_t n) {
  Acc squares = 0;
  for (int64_t i = threadIdx.x; i < n; i += kBlockThreads) squares += row[i] * row[i];
  const Acc sum = block_sum(squares);
  if (!isinf(sum)) return sqrt(sum);
  Acc peak = 0;  // no NaN here: a NaN would have made the sum NaN
  for (int64_t i = threadIdx.x; i < n; i += kBlockThreads) peak = fmax(peak, fabs(row[i]));
  peak = block_max(peak);
  if (!isfinite(peak)) return sum;
  const int e = ilogb(peak);
  Acc scaled = 0;
  for (int64_t i = threadIdx.x; i < n; i += kBlockThreads) {
    const Acc u = ldexp(row[i], -e);
    scaled += u * u;
  }
  return ldexp(sqrt(block_sum(scaled)), e);
}

}  // namespace cuda
}  // namespace kdfast
