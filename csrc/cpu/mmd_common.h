// Shared by the three channel-MMD CPU operators (csrc/cpu/mmd_gram.cpp, mmd_feature_gram.cpp,
// mmd_linear.cpp; docs/design.md, "Channel MMD"): the per-sample loops over the batch, one
// sample's rows in the accumulation dtype, and the row norms ρ = max(r, eps) with their
// unit squares q = ‖x̂‖² (1, or 0 for an all-zero channel).
//
// Parallel over the batch (at::parallel_for, one sample per task: the GEMMs inside run
// single-threaded); with fewer samples than threads the samples run one after another and the
// GEMMs use the threads instead. Every sum has a fixed order: the results are deterministic.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <tuple>
#include <vector>

#include "kdfast/aten_dtype.h"
#include "kdfast/aten_mmd.h"
#include "kdfast/math.h"

#include "kdfast/simd.h"  // KDFAST_SIMD_CLONES: hot loops also built for AVX-512 and AVX2

namespace kdfast::cpu {

// (loss, four saved tensors): the forward outputs of every channel-MMD operator.
using MmdForward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Runs body(first, last) over ranges of samples: in parallel over samples when there are
// enough of them, else once over all (the ATen GEMMs inside then use the threads). A task can
// allocate its scratch once per range. Worker threads get the caller's no-autograd guard too
// (it is thread-local), so out= GEMMs on views of inputs that require grad are allowed.
inline void for_sample_ranges(int64_t batch, const std::function<void(int64_t, int64_t)>& body) {
  if (batch >= at::get_num_threads() && batch > 1) {
    at::parallel_for(0, batch, 1, [&](int64_t first, int64_t last) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      body(first, last);
    });
  } else {
    body(0, batch);
  }
}

// Runs body(b) for every sample, as for_sample_ranges.
inline void for_each_sample(int64_t batch, const std::function<void(int64_t)>& body) {
  for_sample_ranges(batch, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) body(b);
  });
}

// One sample's (C, HW) rows in the accumulation dtype (a copy only for fp16/bf16).
inline at::Tensor sample_rows(const at::Tensor& rows, int64_t b, at::ScalarType acc) {
  return rows.select(0, b).to(acc);
}

template <typename T>
struct RowNorms {
  std::vector<T> inv;   // 1 / ρ
  std::vector<T> sq;    // q = r² / ρ²
  std::vector<char> live;  // r > eps: the normalisation's norm term has a gradient
};

// From the row norms r (at roots[i * stride]) and the normalisation floor eps (kNormEps, or
// kNormEps·s for rows scaled by s): ρ = max(r, eps). q = (r/ρ)², never r²/ρ², which overflows
// for finite r ≳ 1e19 (float). A NaN norm stays NaN (std::max(NaN, eps) is NaN).
template <typename T>
RowNorms<T> norms_from_roots(const T* roots, int64_t count, int64_t stride, T eps) {
  RowNorms<T> norms{std::vector<T>(count), std::vector<T>(count), std::vector<char>(count)};
  for (int64_t i = 0; i < count; ++i) {
    const T r = roots[i * stride];
    const T rho = std::max(r, eps);
    const T unit = r / rho;
    norms.inv[i] = T(1) / rho;
    norms.sq[i] = unit * unit;
    norms.live[i] = r > eps;
  }
  return norms;
}

template <typename T>
RowNorms<T> norms_from_squares(const T* squares, int64_t count, int64_t stride, T eps) {
  std::vector<T> roots(count);
  for (int64_t i = 0; i < count; ++i) roots[i] = std::sqrt(std::max(squares[i * stride], T(0)));
  return norms_from_roots(roots.data(), count, 1, eps);
}

// The backward's outputs: the gradients in the inputs' shapes, or empty ones where not wanted.
inline std::tuple<at::Tensor, at::Tensor> gradients_or_empty(const at::Tensor& dx,
                                                             const at::Tensor& dy,
                                                             const at::Tensor& student,
                                                             const at::Tensor& teacher) {
  return {dx.defined() ? dx.view(student.sizes()) : at::empty({0}, student.options()),
          dy.defined() ? dy.view(teacher.sizes()) : at::empty({0}, teacher.options())};
}

// Gradient buffers in the rows' shape (contiguous), undefined where not wanted.
inline at::Tensor gradient_buffer(const at::Tensor& rows, bool wanted) {
  if (!wanted) return at::Tensor();
  return at::empty(rows.sizes(), rows.options().memory_format(at::MemoryFormat::Contiguous));
}

}  // namespace kdfast::cpu
