// CUDA epilogue of SP's batch Grams (see csrc/cpu/gram.cpp for the math): one block per row,
// fixed-order block reductions, so results are deterministic.
#include "block_reduce.cuh"
#include "gram.h"
#include "kdfast/math.h"

namespace kdfast {
namespace cuda {
namespace {

constexpr int kThreads = kBlockThreads;

template <typename Acc>
__device__ Acc normalise_row(const Acc* a, int64_t n, Acc* g) {
  const Acc r = block_norm(a, n);  // finite for finite A (its sum of squares may overflow)
  const Acc inv = Acc(1) / (r < Acc(kNormEps) ? Acc(kNormEps) : r);  // NaN stays NaN
  for (int64_t j = threadIdx.x; j < n; j += kThreads) g[j] = a[j] * inv;
  return r;
}

template <typename Acc>
__global__ void similarity_forward_kernel(const Acc* a_s, const Acc* a_t, int64_t n, Acc* g_s,
                                          Acc* g_t, Acc* norm_s, Acc* norm_t, Acc* loss) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * n;
  const Acc r_s = normalise_row(a_s + row, n, g_s + row);
  const Acc r_t = normalise_row(a_t + row, n, g_t + row);
  Acc squares = 0;
  for (int64_t j = threadIdx.x; j < n; j += kThreads) {
    const Acc d = g_t[row + j] - g_s[row + j];
    squares += d * d;
  }
  const Acc total = block_sum(squares);
  if (threadIdx.x == 0) {
    norm_s[blockIdx.x] = r_s;
    norm_t[blockIdx.x] = r_t;
    loss[blockIdx.x] = total / static_cast<Acc>(n);
  }
}

// da_i = (dG_i - <dG_i, g_i> g_i) / r_i (dG_i / eps where r_i <= eps), dG = sign 2 D grad_i / n.
template <typename Acc>
__global__ void similarity_row_grad_kernel(const Acc* grad, const Acc* g_s, const Acc* g_t,
                                           const Acc* norm, Acc sign, int64_t n, Acc* da) {
  const int64_t i = blockIdx.x, row = i * n;
  const Acc* g = sign < Acc(0) ? g_s : g_t;
  const Acc coef = sign * Acc(2) * grad[i] / static_cast<Acc>(n);
  const Acc eps = Acc(kNormEps);
  const Acc r = norm[i];
  Acc along = 0;
  if (r > eps) {
    Acc dot = 0;
    for (int64_t j = threadIdx.x; j < n; j += kThreads) {
      dot += coef * (g_t[row + j] - g_s[row + j]) * g[row + j];
    }
    along = block_sum(dot);
  }
  const Acc inv = Acc(1) / (r < eps ? eps : r);
  for (int64_t j = threadIdx.x; j < n; j += kThreads) {
    da[row + j] = (coef * (g_t[row + j] - g_s[row + j]) - along * g[row + j]) * inv;
  }
}

template <typename Acc>
__global__ void symmetrise_kernel(const Acc* da, int64_t n, Acc* w) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (k >= n * n) return;
  const int64_t i = k / n, j = k % n;
  w[k] = da[k] + da[j * n + i];
}

template <typename Fn>
void with_acc(bool is_double, const Fn& fn) {
  if (is_double) fn(double{});
  else fn(float{});
}

unsigned int blocks(int64_t n) { return static_cast<unsigned int>(n); }

}  // namespace

void similarity_forward(bool is_double, const void* a_s, const void* a_t, int64_t n, void* g_s,
                        void* g_t, void* norm_s, void* norm_t, void* loss, cudaStream_t stream) {
  with_acc(is_double, [&](auto acc) {
    using Acc = decltype(acc);
    similarity_forward_kernel<<<blocks(n), kThreads, 0, stream>>>(
        static_cast<const Acc*>(a_s), static_cast<const Acc*>(a_t), n, static_cast<Acc*>(g_s),
        static_cast<Acc*>(g_t), static_cast<Acc*>(norm_s), static_cast<Acc*>(norm_t),
        static_cast<Acc*>(loss));
  });
}

void similarity_backward(bool is_double, const void* grad, const void* g_s, const void* g_t,
                         const void* norm, double sign, int64_t n, void* da, void* w,
                         cudaStream_t stream) {
  with_acc(is_double, [&](auto acc) {
    using Acc = decltype(acc);
    similarity_row_grad_kernel<<<blocks(n), kThreads, 0, stream>>>(
        static_cast<const Acc*>(grad), static_cast<const Acc*>(g_s),
        static_cast<const Acc*>(g_t), static_cast<const Acc*>(norm), static_cast<Acc>(sign), n,
        static_cast<Acc*>(da));
    symmetrise_kernel<<<blocks((n * n + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        static_cast<const Acc*>(da), n, static_cast<Acc*>(w));
  });
}

}  // namespace cuda
}  // namespace kdfast
