// CUDA attention-map kernels: q_hat = normalise_HW(mean_C |A|^p) and its backward.
//
// Forward: one read of A. Each thread (rows layout, HW stride 1: coalesced over positions)
// or each warp (channels-inner layout, C stride 1: coalesced over channels, warp-shuffle
// reduction) sums |A|^p over C for one (b, position); then one block per sample computes the
// norm with a fixed-order tree reduction and scales the row. Backward: one block per sample
// turns dq_hat into dQ (B x HW, small), then an elementwise pass reads A and writes dA with
// A's strides. fp32 accumulation (fp64 for fp64), int64 offsets, no atomics: deterministic.
#include "attention.h"
#include "block_reduce.cuh"
#include "element.cuh"
#include "kdfast/math.h"

namespace kdfast {
namespace cuda {
namespace {

constexpr int kThreads = kBlockThreads;
constexpr int kWarp = 32;

// |v|^p and its derivative, specialised for p = 2 and p = 1.
template <typename Acc>
struct PowTwo {
  __device__ Acc value(Acc v) const { return v * v; }
  __device__ Acc grad(Acc v) const { return Acc(2) * v; }
};
template <typename Acc>
struct PowOne {
  __device__ Acc value(Acc v) const { return v < Acc(0) ? -v : v; }
  __device__ Acc grad(Acc v) const { return Acc((v > Acc(0)) - (v < Acc(0))); }
};
template <typename Acc>
struct PowAny {
  Acc p;
  __device__ Acc value(Acc v) const { return abs_pow(v, p); }
  __device__ Acc grad(Acc v) const { return abs_pow_grad(v, p); }
};

template <typename T, typename Acc, typename Pow>
__global__ void sums_rows_kernel(const T* __restrict__ x, FeatureLayout l, Pow pow,
                                 Acc* __restrict__ q) {
  const int64_t blocks = (l.hw + kThreads - 1) / kThreads;
  const int64_t b = blockIdx.x / blocks;
  const int64_t i = (blockIdx.x % blocks) * kThreads + threadIdx.x;
  if (i >= l.hw) return;
  const T* column = x + b * l.stride_b + i;
  Acc sum = 0;
  for (int64_t c = 0; c < l.channels; ++c) sum += pow.value(to_acc<Acc>(column[c * l.stride_c]));
  q[b * l.hw + i] = sum / static_cast<Acc>(l.channels);
}

template <typename T, typename Acc, typename Pow>
__global__ void sums_channels_inner_kernel(const T* __restrict__ x, FeatureLayout l, Pow pow,
                                           Acc* __restrict__ q) {
  const int warps = kThreads / kWarp;
  const int64_t position = static_cast<int64_t>(blockIdx.x) * warps + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (position >= l.batch * l.hw) return;  // whole warps exit together
  const int64_t b = position / l.hw, i = position % l.hw;
  const T* row = x + b * l.stride_b + i * l.stride_hw;
  Acc sum = 0;
  for (int64_t c = lane; c < l.channels; c += kWarp) sum += pow.value(to_acc<Acc>(row[c]));
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  }
  if (lane == 0) q[position] = sum / static_cast<Acc>(l.channels);
}

template <typename Acc>
__global__ void normalise_kernel(Acc* __restrict__ q, Acc* __restrict__ norm, int64_t hw) {
  Acc* row = q + static_cast<int64_t>(blockIdx.x) * hw;
  const Acc n = block_norm(row, hw);  // finite for finite Q (its sum of squares may overflow)
  const Acc inv = Acc(1) / (n < Acc(kNormEps) ? Acc(kNormEps) : n);  // NaN stays NaN
  for (int64_t i = threadIdx.x; i < hw; i += kThreads) row[i] *= inv;
  if (threadIdx.x == 0) norm[blockIdx.x] = n;
}

// grad_q = (1/C) (g - <g, q_hat> q_hat) / n, or (1/C) g / eps where n <= eps.
template <typename Acc>
__global__ void map_grad_kernel(const Acc* __restrict__ grad_map, const Acc* __restrict__ q_hat,
                                const Acc* __restrict__ norm, int64_t hw, Acc inv_channels,
                                Acc* __restrict__ grad_q) {
  const int64_t offset = static_cast<int64_t>(blockIdx.x) * hw;
  const Acc n = norm[blockIdx.x];
  const Acc eps = Acc(kNormEps);
  Acc along = 0;
  if (n > eps) {
    Acc dot = 0;
    for (int64_t i = threadIdx.x; i < hw; i += kThreads) {
      dot += grad_map[offset + i] * q_hat[offset + i];
    }
    along = block_sum(dot);
  }
  const Acc scale = inv_channels / (n < eps ? eps : n);
  for (int64_t i = threadIdx.x; i < hw; i += kThreads) {
    grad_q[offset + i] = (grad_map[offset + i] - along * q_hat[offset + i]) * scale;
  }
}

// dA = pow'(A) * grad_q; channels_inner orders the flat index (b, position, c), else (b, c, i).
template <typename T, typename Acc, typename Pow>
__global__ void input_grad_kernel(const T* __restrict__ x, FeatureLayout l, Pow pow,
                                  const Acc* __restrict__ grad_q, bool channels_inner,
                                  T* __restrict__ dx) {
  const int64_t total = l.batch * l.channels * l.hw;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; n < total;
       n += step) {
    int64_t b, c, i;
    if (channels_inner) {
      c = n % l.channels;
      i = (n / l.channels) % l.hw;
      b = n / (l.channels * l.hw);
    } else {
      i = n % l.hw;
      c = (n / l.hw) % l.channels;
      b = n / (l.channels * l.hw);
    }
    const int64_t offset = b * l.stride_b + c * l.stride_c + i * l.stride_hw;
    dx[offset] = Store<T>::from(pow.grad(to_acc<Acc>(x[offset])) * grad_q[b * l.hw + i]);
  }
}

unsigned int grid_for(int64_t elements) {
  const int64_t blocks = (elements + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(blocks < 65536 * 16 ? blocks : 65536 * 16);
}

template <typename T, typename Acc, typename Pow>
void forward_typed(const T* x, const FeatureLayout& l, Pow pow, Acc* q, Acc* norm,
                   cudaStream_t stream) {
  if (l.channels_inner()) {
    const int64_t blocks = (l.batch * l.hw + kThreads / kWarp - 1) / (kThreads / kWarp);
    sums_channels_inner_kernel<<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
        x, l, pow, q);
  } else {
    const int64_t blocks = l.batch * ((l.hw + kThreads - 1) / kThreads);
    sums_rows_kernel<<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(x, l, pow, q);
  }
  normalise_kernel<<<static_cast<unsigned int>(l.batch), kThreads, 0, stream>>>(q, norm, l.hw);
}

template <typename T, typename Acc, typename Pow>
void backward_typed(const Acc* grad_map, const T* x, const FeatureLayout& l, const Acc* q_hat,
                    const Acc* norm, Pow pow, Acc* grad_q, T* dx, cudaStream_t stream) {
  map_grad_kernel<<<static_cast<unsigned int>(l.batch), kThreads, 0, stream>>>(
      grad_map, q_hat, norm, l.hw, Acc(1) / static_cast<Acc>(l.channels), grad_q);
  input_grad_kernel<<<grid_for(l.batch * l.channels * l.hw), kThreads, 0, stream>>>(
      x, l, pow, grad_q, l.channels_inner(), dx);
}

// Calls fn(T{}, Acc{}, pow) for the element type and exponent.
template <typename Fn>
void dispatch(DType dtype, double p, const Fn& fn) {
  auto with_pow = [&](auto t, auto acc) {
    using Acc = decltype(acc);
    if (p == 2.0) fn(t, acc, PowTwo<Acc>{});
    else if (p == 1.0) fn(t, acc, PowOne<Acc>{});
    else fn(t, acc, PowAny<Acc>{static_cast<Acc>(p)});
  };
  switch (dtype) {
    case DType::kF32: with_pow(float{}, float{}); break;
    case DType::kF64: with_pow(double{}, double{}); break;
    case DType::kF16: with_pow(__half{}, float{}); break;
    case DType::kBF16: with_pow(__nv_bfloat16{}, float{}); break;
  }
}

}  // namespace

void attention_map_forward(DType dtype, const void* features, const FeatureLayout& layout,
                           double p, void* q_hat, void* norm, cudaStream_t stream) {
  dispatch(dtype, p, [&](auto t, auto acc, auto pow) {
    using T = decltype(t);
    using Acc = decltype(acc);
    forward_typed(static_cast<const T*>(features), layout, pow, static_cast<Acc*>(q_hat),
                  static_cast<Acc*>(norm), stream);
  });
}

void attention_map_backward(DType dtype, const void* grad_map, const void* features,
                            const FeatureLayout& layout, const void* q_hat, const void* norm,
                            double p, void* grad_q, void* grad_features, cudaStream_t stream) {
  dispatch(dtype, p, [&](auto t, auto acc, auto pow) {
    using T = decltype(t);
    using Acc = decltype(acc);
    backward_typed(static_cast<const Acc*>(grad_map), static_cast<const T*>(features), layout,
                   static_cast<const Acc*>(q_hat), static_cast<const Acc*>(norm), pow,
                   static_cast<Acc*>(grad_q), static_cast<T*>(grad_features), stream);
  });
}

}  // namespace cuda
}  // namespace kdfast
