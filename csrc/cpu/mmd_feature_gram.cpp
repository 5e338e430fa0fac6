// Channel MMD with the polynomial kernel of degree 2 through D × D feature Grams, on the CPU:
// operators kdfast::channel_mmd_feature_gram and channel_mmd_feature_gram_backward (schemas in
// csrc/kdfast.cpp). kdfast/ops/mmd.py's channel_mmd_path takes this path when D = H·W is below
// the Gram rows (C_s, + C_t with the teacher term). The math: docs/design.md, "Channel MMD",
// *D × D feature Gram*.
//
// With F = X̂ᵀX̂ (D × D) and s = Σ_i x̂_i, summed over all pairs
//   Σ_ij (ĝ_ij + c)² = ⟨F_a, F_b⟩_F + 2c s_aᵀs_b + c²·rows_a·rows_b
// (because ‖X̂_a X̂_bᵀ‖²_F = tr(F_a F_b)), and the unbiased within-set sums take the diagonal
// Σ_i (q_i + c)² out. The backward of x̂_i is
//   u_i = x̂_i A_x + v_x − [unbiased] 4 w_ss (q_i + c) x̂_i,
//   A_x = 4 w_ss F_x − 4 w_st F_y,  v_x = 4c (w_ss s_x − w_st s_y)
// (symmetrically for the teacher), then the normalisation backward
//   dx_i = g/ρ_i (u_i − [r_i > eps] (x̂_iᵀu_i) x̂_i).
// Saved for the backward: feature_weights = [A_x; A_y] (B, 2, D, D), feature_offsets =
// [v_x; v_y] (B, 2, D), inv_norm_x = 1/ρ_x (B, m), inv_norm_y (B, n).
//
// Per sample: one GEMM per side in the forward and one per input in the backward, everything
// else in plain loops over a per-task (rows × D) scratch of unit rows (no per-sample ATen
// temporaries: at small maps the GEMMs are only a few microseconds each); the row loops are
// compiled for AVX-512 and AVX2 (KDFAST_SIMD_CLONES). Rows normalise themselves through
// kdfast::norm_from_sum_sq, so float32 rows whose Σx² overflows stay finite.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "mmd_common.h"

namespace {

using namespace kdfast::cpu;

struct FeatureOptions {
  double coef;
  bool unbiased, teacher_term;
};

// One sample's rows x (rows × D, any strides, dtype T) as unit rows x̂_i = x_i / ρ_i into the
// contiguous unit (rows × D); returns the norms. Row-major rows are read once (the second read
// of a row for the scaling hits L1).
template <typename T>
KDFAST_SIMD_CLONES RowNorms<T> unit_rows_into(const T* src, int64_t rows, int64_t d, int64_t s0,
                                              int64_t s1, T* __restrict unit) {
  if (s1 != 1) {  // channels_last: gather along the memory order, then work in place
    for (int64_t k = 0; k < d; ++k) {
      for (int64_t i = 0; i < rows; ++i) unit[i * d + k] = src[i * s0 + k * s1];
    }
    src = unit;
  }
  const int64_t row_stride = s1 != 1 ? d : s0;
  std::vector<T> roots(rows);
  for (int64_t i = 0; i < rows; ++i) {
    const T* __restrict row = src + i * row_stride;
    T sq = 0;
#pragma omp simd reduction(+ : sq)
    for (int64_t k = 0; k < d; ++k) sq += row[k] * row[k];
    roots[i] = kdfast::norm_from_sum_sq(sq, row, d, 1);
  }
  RowNorms<T> norms = norms_from_roots(roots.data(), rows, 1, static_cast<T>(kdfast::kNormEps));
  for (int64_t i = 0; i < rows; ++i) {
    const T* row = src + i * row_stride;
    T* out = unit + i * d;
    const T inv = norms.inv[i];
#pragma omp simd
    for (int64_t k = 0; k < d; ++k) out[k] = row[k] * inv;
  }
  return norms;
}

template <typename T>
struct FeatureSide {
  RowNorms<T> norms;
  std::vector<T> sum;  // s = Σ x̂_i (D)
  double diagonal;     // Σ_i (q_i + c)²
};

// sum += Σ_i rows_i over contiguous (rows × d).
template <typename T>
KDFAST_SIMD_CLONES void add_rows(T* __restrict sum, const T* __restrict rows_data, int64_t rows,
                                 int64_t d) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* __restrict row = rows_data + i * d;
#pragma omp simd
    for (int64_t k = 0; k < d; ++k) sum[k] += row[k];
  }
}

// x̂ into unit (a (rows × D) view of the scratch), F = X̂ᵀX̂ into f (D × D).
template <typename T>
FeatureSide<T> feature_side(const at::Tensor& x, at::Tensor unit, at::Tensor f, double coef) {
  const int64_t rows = x.size(0), d = x.size(1);
  T* u = unit.data_ptr<T>();
  FeatureSide<T> side{
      unit_rows_into(x.const_data_ptr<T>(), rows, d, x.stride(0), x.stride(1), u),
      std::vector<T>(d, T(0)), 0.0};
  add_rows(side.sum.data(), u, rows, d);
  for (int64_t i = 0; i < rows; ++i) {
    const double shifted = double(side.norms.sq[i]) + coef;
    side.diagonal += shifted * shifted;
  }
  at::mm_out(f, unit.t(), unit);
  return side;
}

// ⟨F_x, F_y⟩, ⟨F_x, F_x⟩, ⟨F_y, F_y⟩ of two (D × D) blocks, one row at a time.
template <typename T>
KDFAST_SIMD_CLONES std::array<double, 3> frobenius_products(const T* fx, const T* fy, int64_t d) {
  std::array<double, 3> total{0.0, 0.0, 0.0};
  for (int64_t i = 0; i < d; ++i) {
    const T* __restrict a = fx + i * d;
    const T* __restrict b = fy + i * d;
    T xy = 0, xx = 0, yy = 0;
#pragma omp simd reduction(+ : xy, xx, yy)
    for (int64_t k = 0; k < d; ++k) {
      xy += a[k] * b[k];
      xx += a[k] * a[k];
      yy += b[k] * b[k];
    }
    total[0] += xy;
    total[1] += xx;
    total[2] += yy;
  }
  return total;
}

template <typename T>
double dot_of(const std::vector<T>& a, const std::vector<T>& b) {
  double total = 0;
  for (size_t k = 0; k < a.size(); ++k) total += double(a[k]) * double(b[k]);
  return total;
}

// One sample: F_x, F_y into a_b (2, D, D), then A_x, A_y in place; v_b (2, D); 1/ρ. Returns MMD².
template <typename T>
double feature_sample(const at::Tensor& x, const at::Tensor& y, at::Tensor scratch,
                      at::Tensor a_b, T* v_b, T* inv_x, T* inv_y, const FeatureOptions& o,
                      const kdfast::MmdBlockWeights& w) {
  const int64_t m = x.size(0), n = y.size(0), d = x.size(1);
  const double c = o.coef;
  const FeatureSide<T> sx = feature_side<T>(x, scratch.narrow(0, 0, m), a_b.select(0, 0), c);
  const FeatureSide<T> sy = feature_side<T>(y, scratch.narrow(0, 0, n), a_b.select(0, 1), c);
  std::copy(sx.norms.inv.begin(), sx.norms.inv.end(), inv_x);
  std::copy(sy.norms.inv.begin(), sy.norms.inv.end(), inv_y);
  T* fx = a_b.data_ptr<T>();
  T* fy = fx + d * d;
  const auto [xy, xx, yy] = frobenius_products(fx, fy, d);
  double ss = xx + 2 * c * dot_of(sx.sum, sx.sum) + c * c * double(m) * m, tt = 0;
  if (o.unbiased) ss -= sx.diagonal;
  if (o.teacher_term) {
    tt = yy + 2 * c * dot_of(sy.sum, sy.sum) + c * c * double(n) * n;
    if (o.unbiased) tt -= sy.diagonal;
  }
  const double st = xy + 2 * c * dot_of(sx.sum, sy.sum) + c * c * double(m) * n;
  // A_x = 4 w_ss F_x − 4 w_st F_y, A_y = 4 w_tt F_y − 4 w_st F_x, in place.
  const T a_ss = T(4 * w.ss), a_st = T(4 * w.st), a_tt = T(4 * w.tt);
#pragma omp simd
  for (int64_t k = 0; k < d * d; ++k) {
    const T f_x = fx[k], f_y = fy[k];
    fx[k] = a_ss * f_x - a_st * f_y;
    fy[k] = a_tt * f_y - a_st * f_x;
  }
  const T c4 = T(4 * c);
  for (int64_t k = 0; k < d; ++k) {
    v_b[k] = c4 * (T(w.ss) * sx.sum[k] - T(w.st) * sy.sum[k]);
    v_b[d + k] = c4 * (T(w.tt) * sy.sum[k] - T(w.st) * sx.sum[k]);
  }
  return w.ss * ss + w.tt * tt - 2 * w.st * st;
}

MmdForward feature_gram_forward(const at::Tensor& student, const at::Tensor& teacher, double coef,
                                bool unbiased, bool teacher_term) {
  // The ATen calls below are implementation details: no autograd recording through them.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto rows = kdfast::checked_channel_rows(student, teacher, unbiased, teacher_term);
  const at::Tensor &xs = rows.first, &ys = rows.second;
  const FeatureOptions o{coef, unbiased, teacher_term};
  const int64_t batch = xs.size(0), m = xs.size(1), n = ys.size(1), d = xs.size(2);
  const auto acc = kdfast::accumulation_type(xs.scalar_type());
  const auto opts = xs.options().dtype(acc);
  at::Tensor a = at::empty({batch, 2, d, d}, opts), v = at::empty({batch, 2, d}, opts);
  at::Tensor inv_x = at::empty({batch, m}, opts), inv_y = at::empty({batch, n}, opts);
  const kdfast::MmdBlockWeights w = kdfast::mmd_block_weights(m, n, o.unbiased, o.teacher_term);
  std::vector<double> values(batch);
  AT_DISPATCH_FLOATING_TYPES(acc, "channel_mmd_feature_gram", [&] {
    for_sample_ranges(batch, [&](int64_t first, int64_t last) {
      at::Tensor scratch = at::empty({std::max(m, n), d}, opts);
      for (int64_t b = first; b < last; ++b) {
        values[b] = feature_sample<scalar_t>(
            sample_rows(xs, b, acc), sample_rows(ys, b, acc), scratch, a.select(0, b),
            v.data_ptr<scalar_t>() + b * 2 * d, inv_x.data_ptr<scalar_t>() + b * m,
            inv_y.data_ptr<scalar_t>() + b * n, o, w);
      }
    });
  });
  at::Tensor loss = at::tensor(values, xs.options().dtype(at::kDouble)).to(acc);
  return {loss, a, v, inv_x, inv_y};
}

// dx_i = g/ρ_i (u_i − live_i (x̂_iᵀu_i) x̂_i), u_i = x̂_i A + v − [unbiased] 4 w (q_i + c) x̂_i,
// for one sample: X A is one GEMM on the raw rows into prod (rows × D, T, contiguous: out
// itself when out has dtype T), the normalisation and the rest one pass over the rows.
template <typename T>
KDFAST_SIMD_CLONES void feature_grad_rows(T* __restrict u_all, const T* src, int64_t rows,
                                          int64_t d, int64_t s0, int64_t s1, const T* inv,
                                          const T* v, double g, bool unbiased, double w,
                                          double coef) {
  std::vector<T> gathered(s1 == 1 ? 0 : d);  // one strided (channels_last) row
  for (int64_t i = 0; i < rows; ++i) {
    const T* __restrict xi = src + i * s0;
    if (s1 != 1) {
      for (int64_t k = 0; k < d; ++k) gathered[k] = xi[k * s1];
      xi = gathered.data();
    }
    T sq = 0;
#pragma omp simd reduction(+ : sq)
    for (int64_t k = 0; k < d; ++k) sq += xi[k] * xi[k];
    const T r = kdfast::norm_from_sum_sq(sq, xi, d, 1), inv_i = inv[i];
    const bool live = r > static_cast<T>(kdfast::kNormEps);
    const T unit = r * inv_i;  // ‖x̂_i‖ (r² · inv² overflows for finite r ≳ 1e19)
    const T drop = unbiased ? T(4 * w * (double(unit * unit) + coef)) : T(0);
    T* __restrict u = u_all + i * d;
    T proj = 0;  // x_iᵀ u_i
#pragma omp simd reduction(+ : proj)
    for (int64_t k = 0; k < d; ++k) {
      u[k] = inv_i * (u[k] - drop * xi[k]) + v[k];
      proj += xi[k] * u[k];
    }
    const T along = live ? proj * inv_i * inv_i : T(0);
    const T scale = T(g) * inv_i;
#pragma omp simd
    for (int64_t k = 0; k < d; ++k) u[k] = scale * (u[k] - along * xi[k]);
  }
}

template <typename T>
void feature_rows_grad(at::Tensor out, const at::Tensor& x, const T* inv, at::Tensor prod,
                       const at::Tensor& a, const T* v, double g, bool unbiased, double w,
                       double coef) {
  at::mm_out(prod, x, a);
  feature_grad_rows(prod.data_ptr<T>(), x.const_data_ptr<T>(), x.size(0), x.size(1),
                    x.stride(0), x.stride(1), inv, v, g, unbiased, w, coef);
  if (!prod.is_same(out)) out.copy_(prod);
}

// The D × D backward over the batch (per task, for fp16/bf16 outputs, one scratch for U).
void feature_backward(at::Tensor dx, at::Tensor dy, const at::Tensor& xs, const at::Tensor& ys,
                      const at::Tensor& a, const at::Tensor& v, const at::Tensor& inv_x,
                      const at::Tensor& inv_y, const double* g, bool unbiased,
                      bool teacher_term, const kdfast::MmdBlockWeights& w, double coef) {
  const int64_t batch = xs.size(0), m = xs.size(1), n = ys.size(1), d = xs.size(2);
  const auto acc = kdfast::accumulation_type(xs.scalar_type());
  const bool same_type = acc == xs.scalar_type();
  AT_DISPATCH_FLOATING_TYPES(acc, "channel_mmd_feature_backward", [&] {
    for_sample_ranges(batch, [&](int64_t first, int64_t last) {
      at::Tensor prod =
          same_type ? at::Tensor() : at::empty({std::max(m, n), d}, xs.options().dtype(acc));
      for (int64_t b = first; b < last; ++b) {
        const scalar_t* vb = v.const_data_ptr<scalar_t>() + b * 2 * d;
        if (dx.defined()) {
          at::Tensor out = dx.select(0, b);
          feature_rows_grad<scalar_t>(out, sample_rows(xs, b, acc),
                                      inv_x.const_data_ptr<scalar_t>() + b * m,
                                      same_type ? out : prod.narrow(0, 0, m),
                                      a.select(0, b).select(0, 0), vb, g[b], unbiased, w.ss, coef);
        }
        if (dy.defined()) {
          at::Tensor out = dy.select(0, b);
          feature_rows_grad<scalar_t>(out, sample_rows(ys, b, acc),
                                      inv_y.const_data_ptr<scalar_t>() + b * n,
                                      same_type ? out : prod.narrow(0, 0, n),
                                      a.select(0, b).select(0, 1), vb + d, g[b],
                                      unbiased && teacher_term, w.tt, coef);
        }
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor> feature_gram_backward_op(
    const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
    const at::Tensor& feature_weights, const at::Tensor& feature_offsets,
    const at::Tensor& inv_norm_x, const at::Tensor& inv_norm_y, double coef, bool unbiased,
    bool teacher_term, bool grad_student, bool grad_teacher) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor xs = kdfast::channel_rows(student), ys = kdfast::channel_rows(teacher);
  const int64_t m = xs.size(1), n = ys.size(1);
  const at::Tensor g = grad.to(at::kDouble).contiguous();
  at::Tensor dx = gradient_buffer(xs, grad_student), dy = gradient_buffer(ys, grad_teacher);
  const kdfast::MmdBlockWeights w = kdfast::mmd_block_weights(m, n, unbiased, teacher_term);
  feature_backward(dx, dy, xs, ys, feature_weights, feature_offsets, inv_norm_x.contiguous(),
                   inv_norm_y.contiguous(), g.data_ptr<double>(), unbiased, teacher_term, w,
                   coef);
  return gradients_or_empty(dx, dy, student, teacher);
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("channel_mmd_feature_gram", &feature_gram_forward);
  m.impl("channel_mmd_feature_gram_backward", &feature_gram_backward_op);
}
