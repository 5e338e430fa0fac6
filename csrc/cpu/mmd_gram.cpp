// Channel MMD through C × C Grams of the channels (poly and rbf kernels) on the CPU: operators
// kdfast::channel_mmd_gram and channel_mmd_gram_backward (schemas in csrc/kdfast.cpp). The
// math: docs/design.md, "Channel MMD", *Forward* and *Backward*.
//
// Per sample: X (m × D) the student channels, Y (n × D) the teacher's, both read in place
// (a (C, HW) view of the input, row-major or channels_last). Nothing of feature size is
// created besides the gradients (fp16/bf16 samples are upcast one sample at a time).
//
// Forward: G_ss = X Xᵀ (upper triangle only, in row panels), G_st = X Yᵀ, G_tt = Y Yᵀ (upper,
//   only when the teacher term is kept); r² = diag(G), ρ = max(r, eps); ĝ_ij = G_ij / (ρ_i ρ_j).
//   One epilogue per sample applies φ, reduces the three block sums and, when a gradient is
//   wanted, overwrites the Grams in place with the backward matrices
//     W_ss = 2 w_ss φ′(ĝ_ss), W_st = −2 w_st φ′(ĝ_st), W_tt = 2 w_tt φ′(ĝ_tt),
//     c_i  = Σ_j W_ss,ij ĝ_ss,ij + Σ_j W_st,ij ĝ_st,ij   (c^t likewise for the teacher),
//     M_ss = diag(1/ρ) W_ss diag(1/ρ) − diag(c/ρ²),  M_st = diag(1/ρ) W_st diag(1/ρ_t),
//   (the c term only where r > eps: an all-zero channel's normalisation is x / eps).
// Backward: dX = g_b (M_ss X + M_st Y), dY = g_b (M_tt Y + M_stᵀ X): two GEMMs per output.
// Saved for the backward: m_ss (B, m, m), m_st (B, m, n), m_tt (B, n, n) (m_ss / m_tt
// 0-element where that gradient is not wanted) and row_scale (B,).
//
// Overflow: float32 channels with |x| ≳ 1e19/√D have squared norms (the Grams' diagonals)
// past the largest float while their normalised rows, and MMD², are ordinary. A sample whose
// squared row norms exceed max/4 (inf included) is redone on its rows scaled by the power of
// two s = 2^(31 − ilogb(max |x|)) with the floor eps·s (x̂ is unchanged: an exact scaling);
// its M matrices then belong to the scaled rows and the backward applies the chain rule,
// dX = s·g·(M_ss (sX) + M_st (sY)), from the per-sample row_scale. NaN and ±inf values are
// never rescued: they give NaN.
//
// Outside the GEMMs the fp32 hot loops (the rbf and poly epilogues, one pass per Gram row) are
// compiled for AVX-512 and AVX2 (KDFAST_SIMD_CLONES).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "mmd_common.h"

namespace {

using namespace kdfast::cpu;
using kdfast::MmdBlockWeights;
using kdfast::MmdKernelParams;

constexpr int64_t kPanel = 64;  // rows per panel of the symmetric Grams
// Upper triangle (and the diagonal blocks in full) of x xᵀ into out (m × m, contiguous).
void upper_gram(at::Tensor out, const at::Tensor& x) {
  const int64_t m = x.size(0);
  for (int64_t i = 0; i < m; i += kPanel) {
    const int64_t rows = std::min(kPanel, m - i);
    at::Tensor panel = out.narrow(0, i, rows).narrow(1, i, m - i);
    at::mm_out(panel, x.narrow(0, i, rows), x.narrow(0, i, m - i).t());
  }
}

template <typename T>
double sum_of(const std::vector<T>& v) {
  double total = 0;
  for (T e : v) total += e;
  return total;
}

// Σ_ij ĝ_ij of a symmetric Gram whose upper triangle is valid.
template <typename T>
double symmetric_sum(const T* gram, int64_t m, const RowNorms<T>& nx) {
  double total = 0;
  for (int64_t i = 0; i < m; ++i) {
    double row = 0;
    for (int64_t j = i + 1; j < m; ++j) row += gram[i * m + j] * nx.inv[j];
    total += nx.inv[i] * (2 * row + gram[i * m + i] * nx.inv[i]);
  }
  return total;
}

template <typename T>
double cross_sum(const T* gram, int64_t m, int64_t n, const RowNorms<T>& nx,
                 const RowNorms<T>& ny) {
  double total = 0;
  for (int64_t i = 0; i < m; ++i) {
    double row = 0;
    for (int64_t j = 0; j < n; ++j) row += gram[i * n + j] * ny.inv[j];
    total += nx.inv[i] * row;
  }
  return total;
}

// max(x, −87) for x <= 0, exact for every x, NaN kept, in a form GCC vectorises. A float
// compare-select is not if-converted without -ffinite-math-only (8× slower rbf rows), and the
// branch-free x + ½(b + |b|), b = −87 − x, cancels for |x| ≫ 87 (x = −1e10: b rounds to 1e10
// and x became 0, or ±512: exp gave 1 up to inf, e.g. rbf with σ² = 1e−10). Negative floats
// order by their bit patterns as unsigned integers, and an integer min vectorises; + (x − x)
// (0 for finite x) brings back a NaN the integer min would map to −87.
inline float floor_at_minus_87(float x) {
  const uint32_t bits = __builtin_bit_cast(uint32_t, x);
  const uint32_t floor = __builtin_bit_cast(uint32_t, -87.0f);
  return __builtin_bit_cast(float, bits < floor ? bits : floor) + (x - x);
}

// exp(x) for x <= 0 in float, in a form GCC vectorises: Cephes expf (Cody-Waite reduction,
// degree-6 polynomial, about 1 ulp); flushes to 0 below −87. A NaN x stays NaN.
inline float exp_nonpositive(float x) {
  x = floor_at_minus_87(x);
  const float t = x * 1.44269504088896341f;
  const int n = static_cast<int>(t - 0.5f);  // round to nearest for t <= 0
  const float fn = static_cast<float>(n);
  const float r = (x - fn * 0.693359375f) + fn * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * __builtin_bit_cast(float, (n + 127) << 23);
}

// value[j] += e, slope[j] += 2h·e with e = exp(−max(dist[j], 0)·h): the rbf hot loop, cloned
// for AVX-512 and AVX2 and picked at load time.
KDFAST_SIMD_CLONES
void rbf_accumulate(const float* __restrict dist, int64_t count, float h,
                    float* __restrict value, float* __restrict slope) {
  for (int64_t j = 0; j < count; ++j) {
    const float d = 0.5f * (dist[j] + std::fabs(dist[j]));  // max(dist, 0), branch-free
    const float e = exp_nonpositive(-d * h);
    value[j] += e;
    slope[j] += 2.0f * h * e;
  }
}

void rbf_accumulate(const double* __restrict dist, int64_t count, double h,
                    double* __restrict value, double* __restrict slope) {
  for (int64_t j = 0; j < count; ++j) {
    const double e = std::exp(-std::max(dist[j], 0.0) * h);
    value[j] += e;
    slope[j] += 2.0 * h * e;
  }
}

// The whole rbf epilogue of one fp32 Gram row with one bandwidth h, in one pass (the general
// path below takes several passes and is compiled for the baseline ISA only): ĝ = g/(ρ_i ρ_j),
// φ = exp(−max(q_i + q_j − 2ĝ, 0)·h), φ′ = 2h·φ where the distance is not clamped; returns Σ φ
// and, with want_grad, does what epilogue_row does with W = weight2·φ′.
KDFAST_SIMD_CLONES
float rbf_row_one_pass(float* __restrict row, int64_t count, float inv_i, float q_i,
                       const float* __restrict inv_col, const float* __restrict q_col, float h,
                       float weight2, bool want_grad, float* __restrict c_col, float* c_row) {
  float total = 0;
  if (!want_grad) {
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < count; ++j) {
      const float dist = q_i + q_col[j] - 2.0f * (row[j] * inv_i * inv_col[j]);
      total += exp_nonpositive(-0.5f * (dist + std::fabs(dist)) * h);
    }
    return total;
  }
  float c_i = 0;
#pragma omp simd reduction(+ : total, c_i)
  for (int64_t j = 0; j < count; ++j) {
    const float scale = inv_i * inv_col[j];
    const float g = row[j] * scale;
    const float dist = q_i + q_col[j] - 2.0f * g;
    const float e = exp_nonpositive(-0.5f * (dist + std::fabs(dist)) * h);
    total += e;
    const float w = dist < 0.0f ? 0.0f : weight2 * 2.0f * h * e;  // NaN: NaN
    row[j] = w * scale;
    const float wg = w * g;
    c_i += wg;
    c_col[j] += wg;
  }
  *c_row += c_i;
  return total;
}

// The poly epilogue of one fp32 Gram row in one pass, as rbf_row_one_pass: φ = (ĝ + c)^d,
// φ′ = d (ĝ + c)^(d−1).
KDFAST_SIMD_CLONES
float poly_row_one_pass(float* __restrict row, int64_t count, float inv_i,
                        const float* __restrict inv_col, int degree, float coef, float weight2,
                        bool want_grad, float* __restrict c_col, float* c_row) {
  float total = 0, c_i = 0;
  const float slope_scale = weight2 * static_cast<float>(degree);
#pragma omp simd reduction(+ : total, c_i)
  for (int64_t j = 0; j < count; ++j) {
    const float scale = inv_i * inv_col[j];
    const float g = row[j] * scale;
    const float base = g + coef;
    float lower = 1.0f;
    for (int k = 1; k < degree; ++k) lower *= base;
    total += lower * base;
    if (want_grad) {
      const float w = slope_scale * lower;
      row[j] = w * scale;
      const float wg = w * g;
      c_i += wg;
      c_col[j] += wg;
    }
  }
  *c_row += c_i;
  return total;
}

// Per-sample scratch rows for the epilogue (g, φ, φ′ of one Gram row).
template <typename T>
struct RowScratch {
  explicit RowScratch(int64_t size) : g(size), value(size), slope(size), grad(size) {}
  std::vector<T> g, value, slope, grad;
};

// φ and φ′ of count Gram entries g (row i against columns with squared norms q_col).
template <int Kind, typename T>
void kernel_row(const MmdKernelParams<T>& p, const T* __restrict g, T q_i,
                const T* __restrict q_col, int64_t count, T* __restrict value,
                T* __restrict slope, T* __restrict scratch_grad) {
  if (Kind == kdfast::kMmdPoly) {
    // lower = (g + c)^(d−1), built by repeated products so every loop vectorises.
#pragma omp simd
    for (int64_t j = 0; j < count; ++j) {
      value[j] = g[j] + p.coef;
      slope[j] = T(1);
    }
    for (int k = 1; k < p.degree; ++k) {
#pragma omp simd
      for (int64_t j = 0; j < count; ++j) slope[j] *= value[j];
    }
#pragma omp simd
    for (int64_t j = 0; j < count; ++j) {
      const T lower = slope[j];
      slope[j] = T(p.degree) * lower;
      value[j] = lower * value[j];
    }
    return;
  }
  // rbf: dist = max(q_i + q_j − 2g, 0) kept in slope until the exponentials are summed.
  T* dist = slope;
#pragma omp simd
  for (int64_t j = 0; j < count; ++j) {
    dist[j] = q_i + q_col[j] - T(2) * g[j];
    value[j] = T(0);
  }
  T* __restrict dg = scratch_grad;
#pragma omp simd
  for (int64_t j = 0; j < count; ++j) dg[j] = T(0);
  for (int s = 0; s < p.num_bandwidths; ++s) {
    rbf_accumulate(dist, count, p.half_inv_sigma2[s], value, dg);
  }
#pragma omp simd
  for (int64_t j = 0; j < count; ++j) slope[j] = dist[j] < T(0) ? T(0) : dg[j];
}

// One Gram row: Σ φ over count entries; with want_grad writes W·scale over the raw entries,
// adds W·g to c_col[j] and returns Σ_j W·g in c_row.
template <int Kind, typename T>
double epilogue_row(T* __restrict row, int64_t count, T inv_i, T q_i,
                    const T* __restrict inv_col, const T* __restrict q_col,
                    const MmdKernelParams<T>& p, T weight2, bool want_grad,
                    T* __restrict c_col, T* c_row, RowScratch<T>& scratch) {
  if (count <= 0) return 0.0;
  if constexpr (Kind == kdfast::kMmdRbf && std::is_same_v<T, float>) {
    if (p.num_bandwidths == 1) {
      return rbf_row_one_pass(row, count, inv_i, q_i, inv_col, q_col, p.half_inv_sigma2[0],
                              weight2, want_grad, c_col, c_row);
    }
  }
  if constexpr (Kind == kdfast::kMmdPoly && std::is_same_v<T, float>) {
    return poly_row_one_pass(row, count, inv_i, inv_col, p.degree, p.coef, weight2, want_grad,
                             c_col, c_row);
  }
  T* __restrict g = scratch.g.data();
  T* __restrict value = scratch.value.data();
  T* __restrict slope = scratch.slope.data();
#pragma omp simd
  for (int64_t j = 0; j < count; ++j) g[j] = row[j] * inv_i * inv_col[j];
  kernel_row<Kind>(p, g, q_i, q_col, count, value, slope, scratch.grad.data());
  T total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t j = 0; j < count; ++j) total += value[j];
  if (want_grad) {
    T c_i = 0;
#pragma omp simd reduction(+ : c_i)
    for (int64_t j = 0; j < count; ++j) {
      const T w = weight2 * slope[j];
      row[j] = w * inv_i * inv_col[j];
      const T wg = w * g[j];
      c_i += wg;
      c_col[j] += wg;
    }
    *c_row += c_i;
  }
  return static_cast<double>(total);
}

// Σ φ over a symmetric block whose upper triangle is valid. With want_grad, overwrites the
// Gram with M (without its diagonal c term) in full and adds the block's part of c.
template <int Kind, typename T>
double symmetric_block(T* gram, int64_t m, const RowNorms<T>& nx, const MmdKernelParams<T>& p,
                       bool unbiased, T weight2, bool want_grad, std::vector<T>& c,
                       RowScratch<T>& scratch) {
  double total = 0;
  for (int64_t i = 0; i < m; ++i) {
    T* row = gram + i * m;
    const T inv_i = nx.inv[i], q_i = nx.sq[i];
    T c_i = 0, unused = 0;
    // The diagonal entry: counted once, and not at all when unbiased.
    const double diag = epilogue_row<Kind>(row + i, 1, inv_i, q_i, nx.inv.data() + i,
                                           nx.sq.data() + i, p, unbiased ? T(0) : weight2,
                                           want_grad, &c_i, &unused, scratch);
    if (!unbiased) total += diag;
    total += 2 * epilogue_row<Kind>(row + i + 1, m - i - 1, inv_i, q_i, nx.inv.data() + i + 1,
                                    nx.sq.data() + i + 1, p, weight2, want_grad,
                                    c.data() + i + 1, &c_i, scratch);
    c[i] += c_i;
  }
  if (want_grad) {  // mirror the upper triangle
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = i + 1; j < m; ++j) gram[j * m + i] = gram[i * m + j];
    }
  }
  return total;
}

template <int Kind, typename T>
double cross_block(T* gram, int64_t m, int64_t n, const RowNorms<T>& nx, const RowNorms<T>& ny,
                   const MmdKernelParams<T>& p, T weight2, bool want_grad, std::vector<T>& c,
                   std::vector<T>& c_t, RowScratch<T>& scratch) {
  double total = 0;
  for (int64_t i = 0; i < m; ++i) {
    total += epilogue_row<Kind>(gram + i * n, n, nx.inv[i], nx.sq[i], ny.inv.data(),
                                ny.sq.data(), p, weight2, want_grad, c_t.data(), &c[i], scratch);
  }
  return total;
}

// M_ii −= [r_i > eps] c_i / ρ_i².
template <typename T>
void subtract_diagonal(T* matrix, int64_t m, const RowNorms<T>& nx, const std::vector<T>& c) {
  for (int64_t i = 0; i < m; ++i) {
    if (nx.live[i]) matrix[i * m + i] -= c[i] * nx.inv[i] * nx.inv[i];
  }
}

struct MmdOptions {
  int kind;
  int64_t degree;
  double coef;
  std::vector<double> sigma2;
  bool sigma_mean, unbiased, teacher_term, grad_student, grad_teacher;
};

template <typename T>
MmdKernelParams<T> kernel_params(const MmdOptions& o) {
  MmdKernelParams<T> p{};
  p.kind = o.kind;
  p.degree = static_cast<int>(o.degree);
  p.coef = static_cast<T>(o.coef);
  p.num_bandwidths = static_cast<int>(o.sigma2.size());
  for (size_t s = 0; s < o.sigma2.size(); ++s) p.half_inv_sigma2[s] = T(0.5 / o.sigma2[s]);
  return p;
}

// Whether a squared row norm (at squares[i * stride]) is too large for the raw Grams: beyond
// max/4, an entry |G_ij| <= r_i r_j may round past the largest float (or already did: inf).
template <typename T>
bool squares_overflow(const T* squares, int64_t count, int64_t stride) {
  const T limit = std::numeric_limits<T>::max() / 4;
  for (int64_t i = 0; i < count; ++i) {
    if (squares[i * stride] > limit) return true;
  }
  return false;
}

// The power of two s that brings the largest |value| of x and y into [2^31, 2^32), or 0 when
// some value is NaN or ±inf (nothing to rescue). Normalised rows do not change when their raw
// rows are scaled by s (nor does ρ = max(r, eps) with eps scaled too), and s x is exact.
double rescue_scale(const at::Tensor& x, const at::Tensor& y) {
  const double peak = std::max(x.abs().max().item<double>(), y.abs().max().item<double>());
  if (!std::isfinite(peak)) return 0.0;
  return std::ldexp(1.0, 31 - std::ilogb(peak));
}

// One sample of the Gram path: Grams, epilogue, M matrices in place. Returns MMD², or NaN with
// *overflow set (and no epilogue run) when check_overflow and a squared row norm is too large
// for the raw Grams: gram_forward then reruns the sample on rows scaled by rescue_scale.
// eps is the normalisation floor of these rows (kNormEps·s for rows scaled by s).
template <int Kind, typename T>
double gram_sample(const at::Tensor& x, const at::Tensor& y, at::Tensor g_ss, at::Tensor g_st,
                   at::Tensor g_tt, const MmdOptions& o, MmdKernelParams<T> p,
                   const MmdBlockWeights& w, T eps, bool check_overflow, bool* overflow) {
  const int64_t m = x.size(0), n = y.size(0);
  upper_gram(g_ss, x);
  at::mm_out(g_st, x, y.t());
  const bool keep_tt = g_tt.defined() && o.teacher_term;
  if (keep_tt) upper_gram(g_tt, y);
  T* ss = g_ss.data_ptr<T>();
  T* st = g_st.data_ptr<T>();
  T* tt = keep_tt ? g_tt.data_ptr<T>() : nullptr;
  const at::Tensor y_squares = keep_tt ? at::Tensor() : y.square().sum(1);
  const T* sq_y = keep_tt ? tt : y_squares.const_data_ptr<T>();
  const int64_t sq_y_stride = keep_tt ? n + 1 : 1;
  if (check_overflow &&
      (squares_overflow(ss, m, m + 1) || squares_overflow(sq_y, n, sq_y_stride))) {
    *overflow = true;
    return std::numeric_limits<double>::quiet_NaN();
  }

  const RowNorms<T> nx = norms_from_squares(ss, m, m + 1, eps);
  const RowNorms<T> ny = norms_from_squares(sq_y, n, sq_y_stride, eps);
  double teacher_sum = 0;  // Σ_jj' ŷ_jᵀŷ_j' for the "mean" bandwidth
  if (keep_tt) {
    if (o.sigma_mean) teacher_sum = symmetric_sum(tt, n, ny);
  } else {
    if (o.sigma_mean) {
      const at::Tensor inv = at::from_blob(const_cast<T*>(ny.inv.data()), {n}, y.options());
      teacher_sum = at::mv(y.t(), inv).square().sum().item<double>();
    }
  }
  if (o.sigma_mean) {
    const double all = symmetric_sum(ss, m, nx) + 2 * cross_sum(st, m, n, nx, ny) + teacher_sum;
    const double sigma2 = kdfast::mmd_mean_bandwidth(sum_of(nx.sq) + sum_of(ny.sq), all, m + n);
    p.num_bandwidths = 1;
    p.half_inv_sigma2[0] = T(0.5 / sigma2);
  }

  std::vector<T> c(m, T(0)), c_t(n, T(0));
  RowScratch<T> scratch(std::max(m, n));
  const bool grad_s = o.grad_student, grad_t = o.grad_teacher;
  const double sum_ss =
      symmetric_block<Kind>(ss, m, nx, p, o.unbiased, T(2 * w.ss), grad_s, c, scratch);
  const double sum_st =
      cross_block<Kind>(st, m, n, nx, ny, p, T(-2 * w.st), grad_s || grad_t, c, c_t,
                        scratch);
  double sum_tt = 0;
  if (keep_tt) sum_tt = symmetric_block<Kind>(tt, n, ny, p, o.unbiased, T(2 * w.tt), grad_t, c_t,
                                            scratch);
  if (grad_s) subtract_diagonal(ss, m, nx, c);
  if (grad_t) {
    if (!keep_tt) g_tt.zero_();
    subtract_diagonal(g_tt.data_ptr<T>(), n, ny, c_t);
  }
  return w.ss * sum_ss + w.tt * sum_tt - 2 * w.st * sum_st;
}

MmdForward gram_forward(const at::Tensor& xs, const at::Tensor& ys, const MmdOptions& o) {
  const int64_t batch = xs.size(0), m = xs.size(1), n = ys.size(1);
  const auto acc = kdfast::accumulation_type(xs.scalar_type());
  const auto opts = xs.options().dtype(acc);
  // The Grams become the backward's matrices: kept for the batch only where a gradient needs
  // them, else one per-task scratch (G_ss without a student gradient, G_tt for the value only).
  at::Tensor g_ss = o.grad_student ? at::empty({batch, m, m}, opts) : at::Tensor();
  at::Tensor g_st = at::empty({batch, m, n}, opts);
  at::Tensor g_tt = o.grad_teacher ? at::empty({batch, n, n}, opts) : at::Tensor();
  std::vector<double> values(batch);
  const MmdBlockWeights w = kdfast::mmd_block_weights(m, n, o.unbiased, o.teacher_term);
  // Per sample, the scale s of the rows the state was computed from (1, or the rescue's):
  // the backward's dX = s·g·(M_ss (s X) + M_st (s Y)).
  at::Tensor scales = at::ones({batch}, opts);
  AT_DISPATCH_FLOATING_TYPES(acc, "channel_mmd_gram", [&] {
    const MmdKernelParams<scalar_t> p = kernel_params<scalar_t>(o);
    scalar_t* scale_of = scales.data_ptr<scalar_t>();
    for_sample_ranges(batch, [&](int64_t first, int64_t last) {
      const at::Tensor ss_scratch = g_ss.defined() ? at::Tensor() : at::empty({m, m}, opts);
      const at::Tensor tt_scratch =
          g_tt.defined() || !o.teacher_term ? at::Tensor() : at::empty({n, n}, opts);
      for (int64_t b = first; b < last; ++b) {
        const at::Tensor x = sample_rows(xs, b, acc), y = sample_rows(ys, b, acc);
        const at::Tensor ss = g_ss.defined() ? g_ss.select(0, b) : ss_scratch;
        const at::Tensor tt = g_tt.defined() ? g_tt.select(0, b) : tt_scratch;
        auto run = [&](auto kind, const at::Tensor& xr, const at::Tensor& yr, double scale,
                       bool check, bool* overflow) {
          return gram_sample<decltype(kind)::value, scalar_t>(
              xr, yr, ss, g_st.select(0, b), tt, o, p, w,
              static_cast<scalar_t>(kdfast::kNormEps * scale), check, overflow);
        };
        auto sample = [&](auto kind) {
          bool overflow = false;
          const double value = run(kind, x, y, 1.0, true, &overflow);
          if (!overflow) return value;
          const double s = rescue_scale(x, y);
          if (s == 0.0) return run(kind, x, y, 1.0, false, &overflow);  // NaN/inf inputs
          scale_of[b] = static_cast<scalar_t>(s);
          return run(kind, x * s, y * s, s, false, &overflow);
        };
        if (o.kind == kdfast::kMmdPoly) {
          values[b] = sample(std::integral_constant<int, kdfast::kMmdPoly>());
        } else {
          values[b] = sample(std::integral_constant<int, kdfast::kMmdRbf>());
        }
      }
    });
  });
  at::Tensor loss = at::tensor(values, xs.options().dtype(at::kDouble)).to(acc);
  auto none = [&] { return at::empty({0}, opts); };  // distinct: outputs must not alias
  return {loss, o.grad_student ? g_ss : none(), g_st, o.grad_teacher ? g_tt : none(), scales};
}

// out = g (a·p + b·q) for one sample, in the accumulation dtype, then into out's dtype.
void two_gemms(at::Tensor out, const at::Tensor& a, const at::Tensor& p, const at::Tensor& b,
               const at::Tensor& q, double g) {
  if (out.scalar_type() == a.scalar_type()) {
    at::addmm_out(out, out, a, p, 0.0, g);
    at::addmm_out(out, out, b, q, 1.0, g);
    return;
  }
  at::Tensor acc = at::mm(a, p);
  acc.addmm_(b, q, g, g);
  out.copy_(acc);
}

MmdForward gram_forward_op(const at::Tensor& student, const at::Tensor& teacher,
                           c10::string_view kernel, int64_t degree, double coef,
                           at::ArrayRef<double> sigma2, bool sigma_mean, bool unbiased,
                           bool teacher_term, bool grad_student, bool grad_teacher) {
  // The ATen calls below are implementation details: no autograd recording through them.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto rows = kdfast::checked_channel_rows(student, teacher, unbiased, teacher_term);
  const at::Tensor &xs = rows.first, &ys = rows.second;
  kdfast::check_gram_kernel_options(degree, sigma2, sigma_mean);
  const int kind = kdfast::mmd_kernel_kind(kernel);
  TORCH_CHECK(kind != kdfast::kMmdLinear,
              "channel_mmd_gram takes poly or rbf; the linear kernel is channel_mmd_linear");
  const MmdOptions o{kind, degree, coef, std::vector<double>(sigma2.begin(), sigma2.end()),
                     sigma_mean, unbiased, teacher_term, grad_student, grad_teacher};
  return gram_forward(xs, ys, o);
}

std::tuple<at::Tensor, at::Tensor> gram_backward_op(
    const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
    const at::Tensor& m_ss, const at::Tensor& m_st, const at::Tensor& m_tt,
    const at::Tensor& row_scale, bool grad_student, bool grad_teacher) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor xs = kdfast::channel_rows(student), ys = kdfast::channel_rows(teacher);
  const auto acc = kdfast::accumulation_type(xs.scalar_type());
  const at::Tensor g = grad.to(at::kDouble).contiguous();
  const double* gp = g.data_ptr<double>();
  at::Tensor dx = gradient_buffer(xs, grad_student), dy = gradient_buffer(ys, grad_teacher);
  const at::Tensor scales = row_scale.to(at::kDouble).contiguous();
  for_each_sample(xs.size(0), [&](int64_t b) {
    const at::Tensor x = sample_rows(xs, b, acc), y = sample_rows(ys, b, acc);
    // The M matrices belong to the rows scaled by s (1 unless the forward rescued an
    // overflowing sample): dX = s·g·(M_ss (s X) + M_st (s Y)), likewise dY.
    const double scale = scales.const_data_ptr<double>()[b];
    const at::Tensor xr = scale == 1.0 ? x : x * scale, yr = scale == 1.0 ? y : y * scale;
    if (grad_student) {
      two_gemms(dx.select(0, b), m_ss.select(0, b), xr, m_st.select(0, b), yr, gp[b] * scale);
    }
    if (grad_teacher) {
      two_gemms(dy.select(0, b), m_tt.select(0, b), yr, m_st.select(0, b).t(), xr,
                gp[b] * scale);
    }
  });
  return gradients_or_empty(dx, dy, student, teacher);
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("channel_mmd_gram", &gram_forward_op);
  m.impl("channel_mmd_gram_backward", &gram_backward_op);
}
