// Channel MMD with the linear kernel on the CPU: operators kdfast::channel_mmd_linear and
// channel_mmd_linear_backward (schemas in csrc/kdfast.cpp). The math: docs/design.md,
// "Channel MMD", *Linear* (no Gram at all).
//
// With s_x = Σ_i x̂_i and q_i = ‖x̂_i‖² (1, or 0 for an all-zero channel), Σ_{i,j} x̂_iᵀŷ_j =
// s_xᵀs_y, so with the block weights w (1/m², 1/(mn), 1/n² or the unbiased 1/(m(m−1)), ...)
//   MMD² = w_ss (‖s_x‖² − [unbiased] Σ q_i) + w_tt (‖s_y‖² − ...) − 2 w_st s_xᵀ s_y.
// dL/dx̂_i = v = 2 w_ss s_x − 2 w_st s_y is one D-vector for every row; through the
// normalisation x̂ = x/ρ (ρ = max(‖x‖, eps); the norm term only where ‖x‖ > eps)
//   dx_i = g/ρ_i (v − [r_i > eps] (x̂_iᵀ v) x̂_i)
//          − [unbiased] 2 w_ss g (1 − [r_i > eps] q_i) x_i/ρ_i²
// (symmetrically for the teacher). Saved for the backward: sum_x = s_x (B, D), sum_y (B, D),
// inv_norm_x = 1/ρ_x (B, m), inv_norm_y (B, n). Rows normalise themselves through
// kdfast::norm_from_sum_sq, so float32 rows whose Σx² overflows stay finite.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "mmd_common.h"

namespace {

using namespace kdfast::cpu;

// The L2 norms of the rows of one sample's (rows × D) x, finite for finite rows: rows whose
// Σx² overflowed (inf) are redone by norm_from_sum_sq. *largest: the largest norm (NaN-free).
at::Tensor row_norms(const at::Tensor& x, double* largest = nullptr) {
  at::Tensor r = at::linalg_vector_norm(x, 2, {1}).contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "row_norms", [&] {
    scalar_t* out = r.data_ptr<scalar_t>();
    const scalar_t* rows = x.const_data_ptr<scalar_t>();
    double top = 0;
    for (int64_t i = 0; i < x.size(0); ++i) {
      if (std::isinf(out[i])) {  // an inf norm is an inf sum of squares
        out[i] = kdfast::norm_from_sum_sq(out[i], rows + i * x.stride(0), x.size(1), x.stride(1));
      }
      top = out[i] > top ? double(out[i]) : top;
    }
    if (largest != nullptr) *largest = top;
  });
  return r;
}

// Linear kernel, per sample: ρ, q and s = Σ x̂_i. Returns (‖s‖² − [unbiased] Σq) and fills
// inv_rho (1/ρ) and sum_rows (s).
double linear_within(const at::Tensor& x, bool unbiased, at::Tensor inv_rho, at::Tensor sum_rows) {
  const at::Tensor r = row_norms(x);
  const at::Tensor rho = r.clamp_min(kdfast::kNormEps);
  inv_rho.copy_(rho.reciprocal());
  at::mv_out(sum_rows, x.t(), inv_rho);
  double within = sum_rows.square().sum().item<double>();
  if (unbiased) within -= (r / rho).square().sum().item<double>();
  return within;
}

MmdForward linear_forward(const at::Tensor& student, const at::Tensor& teacher, bool unbiased,
                          bool teacher_term) {
  // The ATen calls below are implementation details: no autograd recording through them.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto rows = kdfast::checked_channel_rows(student, teacher, unbiased, teacher_term);
  const at::Tensor &xs = rows.first, &ys = rows.second;
  const int64_t batch = xs.size(0), m = xs.size(1), n = ys.size(1), d = xs.size(2);
  const auto acc = kdfast::accumulation_type(xs.scalar_type());
  const auto opts = xs.options().dtype(acc);
  at::Tensor sum_x = at::empty({batch, d}, opts), sum_y = at::empty({batch, d}, opts);
  at::Tensor inv_x = at::empty({batch, m}, opts), inv_y = at::empty({batch, n}, opts);
  const kdfast::MmdBlockWeights w = kdfast::mmd_block_weights(m, n, unbiased, teacher_term);
  std::vector<double> values(batch);
  for_each_sample(batch, [&](int64_t b) {
    const double within_x = linear_within(sample_rows(xs, b, acc), unbiased, inv_x.select(0, b),
                                          sum_x.select(0, b));
    const double within_y = linear_within(sample_rows(ys, b, acc), unbiased, inv_y.select(0, b),
                                          sum_y.select(0, b));
    const double cross = at::dot(sum_x.select(0, b), sum_y.select(0, b)).item<double>();
    values[b] = w.ss * within_x + w.tt * within_y - 2 * w.st * cross;
  });
  at::Tensor loss = at::tensor(values, xs.options().dtype(at::kDouble)).to(acc);
  return {loss, sum_x, sum_y, inv_x, inv_y};
}

// Linear gradient of one sample's rows: g/ρ_i (v − live_i (x̂_iᵀv) x̂_i) − corr_i x_i with
// corr_i = [unbiased] 2 w g (1 − live_i q_i)/ρ_i², i.e. x_i times c_i/ρ_i² with
// c_i = −g live_i x̂_iᵀv − [unbiased] 2 w g (1 − live_i q_i).
void linear_rows_grad(at::Tensor out, const at::Tensor& x, const at::Tensor& inv_rho,
                      const at::Tensor& v, double g, bool unbiased, double w) {
  double largest = 0;
  const at::Tensor r = row_norms(x, &largest);
  const at::Tensor live = (r > kdfast::kNormEps).to(x.scalar_type());
  const at::Tensor proj = at::mv(x, v) * inv_rho;  // x̂_iᵀ v
  at::Tensor c = -g * live * proj;
  if (unbiased) c = c - 2 * w * g * (1 - live * (r * inv_rho).square());
  // x c/ρ² in one pass, unless 1/ρ² is subnormal (float rows with r > 2^60: rescued overflow
  // territory), where x/ρ is formed first.
  const at::Tensor unit_coeff = c * inv_rho;
  at::Tensor acc = largest > 0x1p60
                       ? (x * inv_rho.unsqueeze(1)).mul_(unit_coeff.unsqueeze(1))
                       : x * (unit_coeff * inv_rho).unsqueeze(1);
  acc.addr_(inv_rho, v, 1.0, g);
  out.copy_(acc);
}

// linear_rows_grad in two plain passes per row (the row's dot products, then the gradient
// written once) for rows of unit stride in the accumulation dtype: the ATen version makes
// about ten calls and four passes over the sample, which cost more than the loss itself on
// small maps (0.6x torch.compile at 64x128x8x8). Same formula, same overflow rule.
template <typename T>
KDFAST_SIMD_CLONES void linear_rows_grad_loops(T* out, int64_t out_stride, const T* x,
                                               int64_t x_stride, int64_t rows, int64_t d,
                                               const T* inv_rho, const T* v, T g, bool unbiased,
                                               T w) {
  std::vector<T> norm(rows), proj(rows);
  T largest = 0;
  for (int64_t i = 0; i < rows; ++i) {
    const T* row = x + i * x_stride;
    T sq = 0, dot = 0;
#pragma omp simd reduction(+ : sq, dot)
    for (int64_t k = 0; k < d; ++k) {
      sq += row[k] * row[k];
      dot += row[k] * v[k];
    }
    norm[i] = kdfast::norm_from_sum_sq(sq, row, d, 1);
    proj[i] = dot * inv_rho[i];
    largest = norm[i] > largest ? norm[i] : largest;
  }
  const bool huge = double(largest) > 0x1p60;
  const T eps = static_cast<T>(kdfast::kNormEps);
  for (int64_t i = 0; i < rows; ++i) {
    const T live = norm[i] > eps ? T(1) : T(0);
    T c = -g * live * proj[i];
    if (unbiased) {
      const T unit = norm[i] * inv_rho[i];
      c -= T(2) * w * g * (T(1) - live * unit * unit);
    }
    const T inv = inv_rho[i], unit_coeff = c * inv, scale_v = g * inv;
    const T* row = x + i * x_stride;
    T* o = out + i * out_stride;
    if (huge) {
#pragma omp simd
      for (int64_t k = 0; k < d; ++k) o[k] = (row[k] * inv) * unit_coeff + scale_v * v[k];
    } else {
      const T coeff = unit_coeff * inv;
#pragma omp simd
      for (int64_t k = 0; k < d; ++k) o[k] = row[k] * coeff + scale_v * v[k];
    }
  }
}

// One sample's gradient rows: the loops above where rows, gradient and v are unit-stride
// rows of the accumulation dtype, else the ATen version.
void sample_rows_grad(at::Tensor out, const at::Tensor& x, const at::Tensor& inv_rho,
                      const at::Tensor& v, double g, bool unbiased, double w) {
  const bool plain = out.scalar_type() == x.scalar_type() && x.stride(1) == 1 &&
                     out.stride(1) == 1 && inv_rho.stride(0) == 1 && v.is_contiguous() &&
                     v.scalar_type() == x.scalar_type() && inv_rho.scalar_type() == x.scalar_type();
  if (!plain) return linear_rows_grad(out, x, inv_rho, v, g, unbiased, w);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear_rows_grad", [&] {
    linear_rows_grad_loops<scalar_t>(out.mutable_data_ptr<scalar_t>(), out.stride(0),
                                     x.const_data_ptr<scalar_t>(), x.stride(0), x.size(0),
                                     x.size(1), inv_rho.const_data_ptr<scalar_t>(),
                                     v.const_data_ptr<scalar_t>(), static_cast<scalar_t>(g),
                                     unbiased, static_cast<scalar_t>(w));
  });
}

std::tuple<at::Tensor, at::Tensor> linear_backward(
    const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
    const at::Tensor& sum_x, const at::Tensor& sum_y, const at::Tensor& inv_norm_x,
    const at::Tensor& inv_norm_y, bool unbiased, bool teacher_term, bool grad_student,
    bool grad_teacher) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor xs = kdfast::channel_rows(student), ys = kdfast::channel_rows(teacher);
  const int64_t batch = xs.size(0), m = xs.size(1), n = ys.size(1);
  const auto acc = kdfast::accumulation_type(xs.scalar_type());
  const at::Tensor g = grad.to(at::kDouble).contiguous();
  const double* gp = g.data_ptr<double>();
  at::Tensor dx = gradient_buffer(xs, grad_student), dy = gradient_buffer(ys, grad_teacher);
  const kdfast::MmdBlockWeights w = kdfast::mmd_block_weights(m, n, unbiased, teacher_term);
  for_each_sample(batch, [&](int64_t b) {
    const at::Tensor sx = sum_x.select(0, b), sy = sum_y.select(0, b);
    if (grad_student) {
      const at::Tensor v = 2 * w.ss * sx - 2 * w.st * sy;
      sample_rows_grad(dx.select(0, b), sample_rows(xs, b, acc), inv_norm_x.select(0, b),
                       v.contiguous(), gp[b], unbiased, w.ss);
    }
    if (grad_teacher) {
      const at::Tensor v = 2 * w.tt * sy - 2 * w.st * sx;
      sample_rows_grad(dy.select(0, b), sample_rows(ys, b, acc), inv_norm_y.select(0, b),
                       v.contiguous(), gp[b], unbiased && teacher_term, w.tt);
    }
  });
  return gradients_or_empty(dx, dy, student, teacher);
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("channel_mmd_linear", &linear_forward);
  m.impl("channel_mmd_linear_backward", &linear_backward);
}
