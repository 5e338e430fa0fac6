// Launchers of the CUDA channel-MMD (NST) epilogues: plain C++ with raw pointers, no torch
// headers, so nvcc compiles csrc/cuda/mmd.cu with the toolkit alone. The Grams and the backward
// GEMMs run through ATen (cuBLAS) in csrc/cuda/mmd_glue.cpp.
//
// Layouts: Grams are contiguous (B, m, m), (B, m, n), (B, n, n) in T (float or double). Row
// statistics are (B, rows) arrays: inv = 1/ρ, sq = r²/ρ², live = r > eps (as 0/1 in T).
#pragma once

#include <cstdint>

#include "kdfast/math.h"

namespace kdfast::cuda {

// inv, sq, live of `rows` rows per sample from squared norms at squares[b*batch_stride + i*stride].
template <typename T>
void mmd_row_norms(const T* squares, int64_t batch, int64_t rows, int64_t batch_stride,
                   int64_t stride, T* inv, T* sq, T* live, void* stream);

// Per sample: σ² = mean squared distance of the pooled rows (sigma2="mean"), from the Grams
// (gram_tt may be null: then teacher_sum[b] = ‖Σ ŷ‖² is given). Writes half_inv_sigma2[b] =
// 1/(2σ²).
template <typename T>
void mmd_mean_bandwidth(const T* gram_ss, const T* gram_st, const T* gram_tt,
                        const T* teacher_sum, const T* inv_x, const T* sq_x, const T* inv_y,
                        const T* sq_y, int64_t batch, int64_t m, int64_t n, T* row_sums,
                        T* half_inv_sigma2, void* stream);

// The fused epilogue: φ of every normalised Gram entry, the three block sums per row into
// partials (B, m + n, 3), and, where asked, the backward matrices
//   M_ss = diag(1/ρ) W_ss diag(1/ρ) − diag(live·c/ρ²), M_st = diag(1/ρ) W_st diag(1/ρ_t),
//   M_tt likewise for the teacher (m_ss / m_tt null when not wanted; m_st needed by either).
// Then loss[b] = w_ss Σ_ss + w_tt Σ_tt − 2 w_st Σ_st, summed in a fixed order.
template <typename T>
void mmd_epilogue(const T* gram_ss, const T* gram_st, const T* gram_tt, const T* inv_x,
                  const T* sq_x, const T* live_x, const T* inv_y, const T* sq_y,
                  const T* live_y, const MmdKernelParams<T>& params,
                  const T* half_inv_sigma2, int64_t batch, int64_t m, int64_t n, bool unbiased,
                  bool teacher_term, T* m_ss, T* m_st, T* m_tt, T* partials, T* loss,
                  void* stream);

}  // namespace kdfast::cuda
