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
//
// The forward makes no per-sample ATen call: for each block of up to kLinearRowBlock rows (one
// parallel task), r_i, 1/ρ_i, Σ q_i and the block's part of s in one pass over its rows (two
// for channels_last), then per sample s = Σ of its blocks' parts in block order and ‖s_x‖²,
// ‖s_y‖², s_xᵀ s_y summed in double. s and 1/ρ are in the accumulation dtype (float for
// fp16/bf16 rows, which are read as they are); the loss is formed in double and returned in
// the accumulation dtype.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <type_traits>

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

// ‖row‖ from its plain sum of squares (kdfast::norm_from_sum_sq), for rows of any input
// dtype: an fp16/bf16 row whose Σx² overflowed is converted to T first (rare: bf16 only).
template <typename In, typename T>
T row_norm(T sum_sq, const In* row, int64_t d, int64_t stride) {
  if constexpr (std::is_same_v<In, T>) {
    return kdfast::norm_from_sum_sq(sum_sq, row, d, stride);
  } else {
    if (!std::isinf(sum_sq)) return std::sqrt(sum_sq);
    std::vector<T> wide(d);
    for (int64_t k = 0; k < d; ++k) wide[k] = static_cast<T>(row[k * stride]);
    return kdfast::norm_from_sum_sq(sum_sq, wide.data(), d, 1);
  }
}

// One block of rows (rows × d, row i at x[i·row_stride], position k at k·col_stride) in the
// accumulation dtype T: inv_rho[i] = 1/ρ_i (ρ = max(r, eps); a NaN norm stays NaN), sums =
// Σ_i x_i/ρ_i (the block's part of s); returns Σ_i q_i (q = (r/ρ)²). Row by row where the
// positions are contiguous, else (channels_last) position by position, inv_rho holding the
// sums of squares until the norms are known.
template <typename In, typename T>
KDFAST_SIMD_CLONES double linear_block(const In* x, int64_t row_stride, int64_t col_stride,
                                       int64_t rows, int64_t d, T* inv_rho, T* sums) {
  const T eps = static_cast<T>(kdfast::kNormEps);
  double unit_sq = 0;
  auto normalise = [&](int64_t i, T r) {
    const T rho = r < eps ? eps : r;
    const T unit = r / rho;
    unit_sq += double(unit * unit);
    inv_rho[i] = T(1) / rho;
  };
  if (col_stride == 1) {
    std::fill(sums, sums + d, T(0));
    for (int64_t i = 0; i < rows; ++i) {
      const In* row = x + i * row_stride;
      T sq = 0;
#pragma omp simd reduction(+ : sq)
      for (int64_t k = 0; k < d; ++k) sq += static_cast<T>(row[k]) * static_cast<T>(row[k]);
      normalise(i, row_norm(sq, row, d, 1));
      const T inv = inv_rho[i];
#pragma omp simd
      for (int64_t k = 0; k < d; ++k) sums[k] += static_cast<T>(row[k]) * inv;
    }
    return unit_sq;
  }
  std::fill(inv_rho, inv_rho + rows, T(0));
  for (int64_t k = 0; k < d; ++k) {
    const In* col = x + k * col_stride;
#pragma omp simd
    for (int64_t i = 0; i < rows; ++i) {
      const T v = static_cast<T>(col[i * row_stride]);
      inv_rho[i] += v * v;
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
    normalise(i, row_norm(inv_rho[i], x + i * row_stride, d, col_stride));
  }
  for (int64_t k = 0; k < d; ++k) {
    const In* col = x + k * col_stride;
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < rows; ++i) sum += static_cast<T>(col[i * row_stride]) * inv_rho[i];
    sums[k] = sum;
  }
  return unit_sq;
}

// Rows per block of linear_block: the unit of work of the forward's parallel loop, fixed so
// that the order of every sum (and so the result) does not depend on the thread count.
constexpr int64_t kLinearRowBlock = 256;

// One set's (B, rows, D) features in blocks of kLinearRowBlock rows: 1/ρ (B, rows), s (B, D),
// the blocks' parts of s (B, blocks, D; a view of s when one block) and of Σq (B · blocks).
struct LinearSet {
  at::Tensor rows, inv_rho, sums, block_sums;
  std::vector<double> unit_sq;
  int64_t blocks;
};

LinearSet linear_set(const at::Tensor& rows, const at::TensorOptions& opts) {
  const int64_t batch = rows.size(0), count = rows.size(1), d = rows.size(2);
  const int64_t blocks = std::max<int64_t>(1, (count + kLinearRowBlock - 1) / kLinearRowBlock);
  at::Tensor sums = at::empty({batch, d}, opts);
  at::Tensor block_sums =
      blocks == 1 ? sums.view({batch, 1, d}) : at::empty({batch, blocks, d}, opts);
  return {rows, at::empty({batch, count}, opts), sums, block_sums,
          std::vector<double>(batch * blocks), blocks};
}

// Block j of sample b of one set: linear_block on its rows.
template <typename In, typename T>
void run_linear_block(LinearSet& set, int64_t b, int64_t j) {
  const at::Tensor& x = set.rows;
  const int64_t first = j * kLinearRowBlock, count = x.size(1), d = x.size(2);
  const int64_t rows = std::max<int64_t>(0, std::min(kLinearRowBlock, count - first));
  const In* data = x.const_data_ptr<In>() + b * x.stride(0) + first * x.stride(1);
  T* inv_rho = set.inv_rho.mutable_data_ptr<T>() + b * count + first;
  T* sums = set.block_sums.mutable_data_ptr<T>() + (b * set.blocks + j) * d;
  set.unit_sq[b * set.blocks + j] =
      linear_block<In, T>(data, x.stride(1), x.stride(2), rows, d, inv_rho, sums);
}

// Sample b of one set once its blocks are done: s = Σ_j (block j's part), in block order,
// and returns ‖s‖² − [unbiased] Σq, in double.
template <typename T>
double linear_within(LinearSet& set, int64_t b, bool unbiased) {
  const int64_t d = set.sums.size(1);
  T* s = set.sums.mutable_data_ptr<T>() + b * d;
  const T* parts = set.block_sums.const_data_ptr<T>() + b * set.blocks * d;
  if (set.blocks > 1) {
    std::copy(parts, parts + d, s);
    for (int64_t j = 1; j < set.blocks; ++j) {
      for (int64_t k = 0; k < d; ++k) s[k] += parts[j * d + k];
    }
  }
  double within = 0;
  for (int64_t k = 0; k < d; ++k) within += double(s[k]) * double(s[k]);
  if (unbiased) {
    for (int64_t j = 0; j < set.blocks; ++j) within -= set.unit_sq[b * set.blocks + j];
  }
  return within;
}

// s_xᵀ s_y of sample b, in double.
template <typename T>
double linear_cross(const LinearSet& x, const LinearSet& y, int64_t b) {
  const int64_t d = x.sums.size(1);
  const T* sx = x.sums.const_data_ptr<T>() + b * d;
  const T* sy = y.sums.const_data_ptr<T>() + b * d;
  double cross = 0;
  for (int64_t k = 0; k < d; ++k) cross += double(sx[k]) * double(sy[k]);
  return cross;
}

// The forward in two parallel loops and no ATen call per sample: the row blocks of both sets
// (one task a block, a sample's student and teacher blocks side by side), then per sample the
// sums of the blocks and the loss. fp16/bf16 rows are read as they are, worked in float.
MmdForward linear_forward(const at::Tensor& student, const at::Tensor& teacher, bool unbiased,
                          bool teacher_term) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto rows = kdfast::checked_channel_rows(student, teacher, unbiased, teacher_term);
  const at::Tensor &xs = rows.first, &ys = rows.second;
  const int64_t batch = xs.size(0), m = xs.size(1), n = ys.size(1), d = xs.size(2);
  const auto acc = kdfast::accumulation_type(xs.scalar_type());
  const auto opts = xs.options().dtype(acc);
  LinearSet x = linear_set(xs, opts), y = linear_set(ys, opts);
  const kdfast::MmdBlockWeights w = kdfast::mmd_block_weights(m, n, unbiased, teacher_term);
  at::Tensor values = at::empty({batch}, xs.options().dtype(at::kDouble));
  double* value = values.mutable_data_ptr<double>();
  const int64_t per_sample = x.blocks + y.blocks;
  const int64_t sample_work = std::max<int64_t>(1, (m + n) * d);
  const int64_t task_grain =
      std::max<int64_t>(1, at::internal::GRAIN_SIZE * per_sample / sample_work);
  const int64_t sample_grain =
      std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, per_sample * d));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs.scalar_type(), "linear_forward",
                                  [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    at::parallel_for(0, batch * per_sample, task_grain, [&](int64_t first, int64_t last) {
      for (int64_t t = first; t < last; ++t) {
        const int64_t b = t / per_sample, j = t % per_sample;
        if (j < x.blocks) {
          run_linear_block<scalar_t, T>(x, b, j);
        } else {
          run_linear_block<scalar_t, T>(y, b, j - x.blocks);
        }
      }
    });
    at::parallel_for(0, batch, sample_grain, [&](int64_t first, int64_t last) {
      for (int64_t b = first; b < last; ++b) {
        const double within_x = linear_within<T>(x, b, unbiased);
        const double within_y = linear_within<T>(y, b, unbiased);
        value[b] = w.ss * within_x + w.tt * within_y - 2 * w.st * linear_cross<T>(x, y, b);
      }
    });
  });
  return {values.to(acc), x.sums, y.sums, x.inv_rho, y.inv_rho};
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

// One set's gradient rows of every sample by linear_rows_grad_loops, for rows of unit stride
// in the accumulation dtype (float, double) and contiguous saved tensors; in parallel over
// samples, no ATen call per sample. v = 2 w_own s_own − 2 w_st s_other (in double, then T).
template <typename T>
void linear_set_grad(at::Tensor& out, const at::Tensor& x, const at::Tensor& inv_rho,
                     const at::Tensor& own_sums, const at::Tensor& other_sums, const double* g,
                     double w_own, double w_st, bool unbiased) {
  const int64_t batch = x.size(0), rows = x.size(1), d = x.size(2);
  T* o = out.mutable_data_ptr<T>();
  const T* xp = x.const_data_ptr<T>();
  const T *inv = inv_rho.const_data_ptr<T>(), *own = own_sums.const_data_ptr<T>(),
          *other = other_sums.const_data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE /
                                                 std::max<int64_t>(1, rows * d));
  at::parallel_for(0, batch, grain, [&](int64_t first, int64_t last) {
    std::vector<T> v(d);
    for (int64_t b = first; b < last; ++b) {
      for (int64_t k = 0; k < d; ++k) {
        v[k] = static_cast<T>(2 * w_own * double(own[b * d + k]) -
                              2 * w_st * double(other[b * d + k]));
      }
      linear_rows_grad_loops<T>(o + b * rows * d, d, xp + b * x.stride(0), x.stride(1), rows, d,
                                inv + b * rows, v.data(), static_cast<T>(g[b]), unbiased,
                                static_cast<T>(w_own));
    }
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
  const bool plain = xs.scalar_type() == acc && xs.stride(2) == 1 && ys.stride(2) == 1 &&
                     sum_x.is_contiguous() && sum_y.is_contiguous() &&
                     inv_norm_x.is_contiguous() && inv_norm_y.is_contiguous() &&
                     sum_x.scalar_type() == acc && inv_norm_x.scalar_type() == acc;
  if (plain) {
    AT_DISPATCH_FLOATING_TYPES(acc, "linear_backward", [&] {
      if (grad_student) {
        linear_set_grad<scalar_t>(dx, xs, inv_norm_x, sum_x, sum_y, gp, w.ss, w.st, unbiased);
      }
      if (grad_teacher) {
        linear_set_grad<scalar_t>(dy, ys, inv_norm_y, sum_y, sum_x, gp, w.tt, w.st,
                                  unbiased && teacher_term);
      }
    });
    return gradients_or_empty(dx, dy, student, teacher);
  }
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
