// CUDA epilogues of the channel MMD (NST) C × C Gram path (operator kdfast::channel_mmd_gram,
// glue in mmd_glue.cpp); the math is docs/design.md, "Channel MMD" and the header comment of
// csrc/cpu/mmd_gram.cpp. The Grams come from cuBLAS (through ATen in the glue);
// here: the row norms from their diagonals, the "mean" bandwidth, φ of every normalised entry
// with the three block sums, the backward matrices M_ss, M_st, M_tt, and the per-sample loss.
//
// Determinism: every sum is a per-block tree reduction in shared memory (block_sum of
// block_reduce.cuh) into a per-row partial, and the per-sample totals reduce those partials in
// a fixed order. No atomics.
#include <cuda_runtime.h>

#include "block_reduce.cuh"
#include "kdfast/math.h"
#include "mmd.h"

namespace kdfast::cuda {
namespace {

constexpr int kThreads = kBlockThreads;  // every block reduces with block_sum

template <typename T>
__global__ void row_norms_kernel(const T* squares, int64_t batch, int64_t rows,
                                 int64_t batch_stride, int64_t stride, T* inv, T* sq, T* live) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= batch * rows) return;
  const int64_t b = idx / rows, i = idx % rows;
  T s = squares[b * batch_stride + i * stride];
  s = s < T(0) ? T(0) : s;  // comparisons that keep a NaN norm NaN
  const T r = sqrt(s);
  const T eps = static_cast<T>(kNormEps);
  const T rho = r < eps ? eps : r;
  const T unit = r / rho;
  inv[idx] = T(1) / rho;
  sq[idx] = unit * unit;
  live[idx] = r > eps ? T(1) : T(0);
}

// Row sums of the normalised Grams for the "mean" bandwidth: student row i gives
// Σ_j ĝ_ss,ij + 2 Σ_j ĝ_st,ij, teacher row j gives Σ_k ĝ_tt,jk (when the Gram exists).
template <typename T>
__global__ void gram_row_sums_kernel(const T* gram_ss, const T* gram_st, const T* gram_tt,
                                     const T* inv_x, const T* inv_y, int64_t m, int64_t n,
                                     T* row_sums) {
  const int64_t b = blockIdx.y, row = blockIdx.x;
  T sum = 0;
  if (row < m) {
    const T* ss = gram_ss + (b * m + row) * m;
    const T* st = gram_st + (b * m + row) * n;
    for (int64_t j = threadIdx.x; j < m; j += kThreads) sum += ss[j] * inv_x[b * m + j];
    for (int64_t j = threadIdx.x; j < n; j += kThreads) sum += T(2) * st[j] * inv_y[b * n + j];
    sum *= inv_x[b * m + row];
  } else if (gram_tt != nullptr) {
    const int64_t j = row - m;
    const T* tt = gram_tt + (b * n + j) * n;
    for (int64_t k = threadIdx.x; k < n; k += kThreads) sum += tt[k] * inv_y[b * n + k];
    sum *= inv_y[b * n + j];
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) row_sums[b * (m + n) + row] = sum;
}

template <typename T>
__global__ void mean_bandwidth_kernel(const T* row_sums, const T* teacher_sum, const T* sq_x,
                                      const T* sq_y, int64_t m, int64_t n, T* half_inv_sigma2) {
  const int64_t b = blockIdx.x;
  T gram_total = 0, sq_total = 0;
  for (int64_t r = threadIdx.x; r < m + n; r += kThreads) {
    gram_total += row_sums[b * (m + n) + r];
    sq_total += r < m ? sq_x[b * m + r] : sq_y[b * n + (r - m)];
  }
  gram_total = block_sum(gram_total);
  sq_total = block_sum(sq_total);
  if (threadIdx.x == 0) {
    if (teacher_sum != nullptr) gram_total += teacher_sum[b];
    const double sigma2 = kdfast::mmd_mean_bandwidth(double(sq_total), double(gram_total), m + n);
    half_inv_sigma2[b] = static_cast<T>(0.5 / sigma2);
  }
}

template <typename T>
struct EpilogueArgs {
  const T *gram_ss, *gram_st, *gram_tt;
  const T *inv_x, *sq_x, *live_x, *inv_y, *sq_y, *live_y;
  const T* half_inv_sigma2;
  int64_t m, n;
  bool unbiased, teacher_term;
  T *m_ss, *m_st, *m_tt, *partials;
};

// One block per Gram row: rows [0, m) are the student's (ss row and st row), rows [m, m + n)
// the teacher's (tt row, and the st column for the teacher's c).
template <typename T>
__global__ void epilogue_kernel(EpilogueArgs<T> a, MmdKernelParams<T> p) {
  const int64_t b = blockIdx.y, row = blockIdx.x, m = a.m, n = a.n;
  if (a.half_inv_sigma2 != nullptr) {
    p.num_bandwidths = 1;
    p.half_inv_sigma2[0] = a.half_inv_sigma2[b];
  }
  const MmdBlockWeights w = mmd_block_weights(m, n, a.unbiased, a.teacher_term);
  const T* inv_x = a.inv_x + b * m;
  const T* sq_x = a.sq_x + b * m;
  const T* inv_y = a.inv_y + b * n;
  const T* sq_y = a.sq_y + b * n;
  T* part = a.partials + (b * (m + n) + row) * 3;
  T d;
  if (row < m) {
    const int64_t i = row;
    const T inv_i = inv_x[i], q_i = sq_x[i];
    const T* ss = a.gram_ss + (b * m + i) * m;
    const T* st = a.gram_st + (b * m + i) * n;
    T* out_ss = a.m_ss != nullptr ? a.m_ss + (b * m + i) * m : nullptr;
    T* out_st = a.m_st != nullptr ? a.m_st + (b * m + i) * n : nullptr;
    T sum_ss = 0, sum_st = 0, c = 0;
    for (int64_t j = threadIdx.x; j < m; j += kThreads) {
      const T g = ss[j] * inv_i * inv_x[j];
      const T v = mmd_kernel(p, g, q_i, sq_x[j], &d);
      const bool skip = a.unbiased && j == i;
      const T weight = skip ? T(0) : T(2 * w.ss) * d;
      if (!skip) sum_ss += v;
      if (out_ss != nullptr) {
        out_ss[j] = weight * inv_i * inv_x[j];
        c += weight * g;
      }
    }
    for (int64_t j = threadIdx.x; j < n; j += kThreads) {
      const T g = st[j] * inv_i * inv_y[j];
      sum_st += mmd_kernel(p, g, q_i, sq_y[j], &d);
      const T weight = T(-2 * w.st) * d;
      if (out_st != nullptr) out_st[j] = weight * inv_i * inv_y[j];
      c += weight * g;
    }
    sum_ss = block_sum(sum_ss);
    sum_st = block_sum(sum_st);
    c = block_sum(c);
    if (threadIdx.x == 0) {
      part[0] = sum_ss;
      part[1] = sum_st;
      part[2] = T(0);
      if (out_ss != nullptr && a.live_x[b * m + i] > T(0)) out_ss[i] -= c * inv_i * inv_i;
    }
    return;
  }
  const int64_t j = row - m;
  const T inv_j = inv_y[j], q_j = sq_y[j];
  T* out_tt = a.m_tt != nullptr ? a.m_tt + (b * n + j) * n : nullptr;
  T sum_tt = 0, c = 0;
  if (a.teacher_term) {
    const T* tt = a.gram_tt + (b * n + j) * n;
    for (int64_t k = threadIdx.x; k < n; k += kThreads) {
      const T g = tt[k] * inv_j * inv_y[k];
      const T v = mmd_kernel(p, g, q_j, sq_y[k], &d);
      const bool skip = a.unbiased && k == j;
      const T weight = skip ? T(0) : T(2 * w.tt) * d;
      if (!skip) sum_tt += v;
      if (out_tt != nullptr) {
        out_tt[k] = weight * inv_j * inv_y[k];
        c += weight * g;
      }
    }
  } else if (out_tt != nullptr) {
    for (int64_t k = threadIdx.x; k < n; k += kThreads) out_tt[k] = T(0);
  }
  if (out_tt != nullptr) {  // the teacher's part of the cross block: column j of G_st
    for (int64_t i = threadIdx.x; i < m; i += kThreads) {
      const T g = a.gram_st[(b * m + i) * n + j] * inv_x[i] * inv_j;
      mmd_kernel(p, g, sq_x[i], q_j, &d);
      c += T(-2 * w.st) * d * g;
    }
  }
  sum_tt = block_sum(sum_tt);
  c = block_sum(c);
  if (threadIdx.x == 0) {
    part[0] = T(0);
    part[1] = T(0);
    part[2] = sum_tt;
    if (out_tt != nullptr && a.live_y[b * n + j] > T(0)) out_tt[j] -= c * inv_j * inv_j;
  }
}

template <typename T>
__global__ void loss_kernel(const T* partials, int64_t m, int64_t n, bool unbiased,
                            bool teacher_term, T* loss) {
  const int64_t b = blockIdx.x;
  double ss = 0, st = 0, tt = 0;
  for (int64_t r = threadIdx.x; r < m + n; r += kThreads) {
    const T* part = partials + (b * (m + n) + r) * 3;
    ss += part[0];
    st += part[1];
    tt += part[2];
  }
  ss = block_sum(ss);
  st = block_sum(st);
  tt = block_sum(tt);
  if (threadIdx.x == 0) {
    const MmdBlockWeights w = mmd_block_weights(m, n, unbiased, teacher_term);
    loss[b] = static_cast<T>(w.ss * ss + w.tt * tt - 2 * w.st * st);
  }
}

unsigned int blocks_for(int64_t count) {
  return static_cast<unsigned int>((count + kThreads - 1) / kThreads);
}

}  // namespace

template <typename T>
void mmd_row_norms(const T* squares, int64_t batch, int64_t rows, int64_t batch_stride,
                   int64_t stride, T* inv, T* sq, T* live, void* stream) {
  if (batch * rows == 0) return;
  row_norms_kernel<T><<<blocks_for(batch * rows), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      squares, batch, rows, batch_stride, stride, inv, sq, live);
}

template <typename T>
void mmd_mean_bandwidth(const T* gram_ss, const T* gram_st, const T* gram_tt,
                        const T* teacher_sum, const T* inv_x, const T* sq_x, const T* inv_y,
                        const T* sq_y, int64_t batch, int64_t m, int64_t n, T* row_sums,
                        T* half_inv_sigma2, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  const dim3 grid(static_cast<unsigned int>(m + n), static_cast<unsigned int>(batch));
  gram_row_sums_kernel<T><<<grid, kThreads, 0, s>>>(gram_ss, gram_st, gram_tt, inv_x, inv_y, m,
                                                    n, row_sums);
  mean_bandwidth_kernel<T><<<static_cast<unsigned int>(batch), kThreads, 0, s>>>(
      row_sums, gram_tt != nullptr ? nullptr : teacher_sum, sq_x, sq_y, m, n, half_inv_sigma2);
}

template <typename T>
void mmd_epilogue(const T* gram_ss, const T* gram_st, const T* gram_tt, const T* inv_x,
                  const T* sq_x, const T* live_x, const T* inv_y, const T* sq_y,
                  const T* live_y, const MmdKernelParams<T>& params,
                  const T* half_inv_sigma2, int64_t batch, int64_t m, int64_t n, bool unbiased,
                  bool teacher_term, T* m_ss, T* m_st, T* m_tt, T* partials, T* loss,
                  void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  EpilogueArgs<T> a{gram_ss, gram_st, gram_tt, inv_x, sq_x, live_x, inv_y, sq_y, live_y,
                    half_inv_sigma2, m, n, unbiased, teacher_term, m_ss, m_st, m_tt, partials};
  const dim3 grid(static_cast<unsigned int>(m + n), static_cast<unsigned int>(batch));
  epilogue_kernel<T><<<grid, kThreads, 0, s>>>(a, params);
  loss_kernel<T><<<static_cast<unsigned int>(batch), kThreads, 0, s>>>(partials, m, n, unbiased,
                                                                        teacher_term, loss);
}

#define KDFAST_INSTANTIATE_MMD(T)                                                              \
  template void mmd_row_norms<T>(const T*, int64_t, int64_t, int64_t, int64_t, T*, T*, T*,    \
                                 void*);                                                        \
  template void mmd_mean_bandwidth<T>(const T*, const T*, const T*, const T*, const T*,        \
                                      const T*, const T*, const T*, int64_t, int64_t, int64_t, \
                                      T*, T*, void*);                                           \
  template void mmd_epilogue<T>(const T*, const T*, const T*, const T*, const T*, const T*,    \
                                const T*, const T*, const T*, const MmdKernelParams<T>&,       \
                                const T*, int64_t, int64_t, int64_t, bool, bool, T*, T*, T*,   \
                                T*, T*, void*);

KDFAST_INSTANTIATE_MMD(float)
KDFAST_INSTANTIATE_MMD(double)

}  // namespace kdfast::cuda
