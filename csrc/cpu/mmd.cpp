// Channel MMD (NST) forward and backward on the CPU. The math is docs/design.md, "Channel MMD".
//
// Per sample: X (m × D) the student channels, Y (n × D) the teacher's, both read in place
// (a (C, HW) view of the input, row-major or channels_last). Nothing of feature size is
// created besides the gradients (fp16/bf16 samples are upcast one sample at a time).
//
// Forward, Gram kernels (poly, rbf):
//   G_ss = X Xᵀ (upper triangle only, in row panels), G_st = X Yᵀ, G_tt = Y Yᵀ (upper, only
//   when the teacher term is kept); r² = diag(G), ρ = max(r, eps); ĝ_ij = G_ij / (ρ_i ρ_j).
//   One epilogue per sample applies φ, reduces the three block sums and, when a gradient is
//   wanted, overwrites the Grams in place with the backward matrices
//     W_ss = 2 w_ss φ′(ĝ_ss), W_st = −2 w_st φ′(ĝ_st), W_tt = 2 w_tt φ′(ĝ_tt),
//     c_i  = Σ_j W_ss,ij ĝ_ss,ij + Σ_j W_st,ij ĝ_st,ij   (c^t likewise for the teacher),
//     M_ss = diag(1/ρ) W_ss diag(1/ρ) − diag(c/ρ²),  M_st = diag(1/ρ) W_st diag(1/ρ_t),
//   (the c term only where r > eps: an all-zero channel's normalisation is x / eps).
// Backward: dX = g_b (M_ss X + M_st Y), dY = g_b (M_tt Y + M_stᵀ X): two GEMMs per output.
//
// Linear kernel: no Gram. With s_x = Σ_i x̂_i, q_i = ‖x̂_i‖²,
//   MMD² = w_ss (‖s_x‖² − [unbiased] Σ q_i) + w_tt (‖s_y‖² − ...) − 2 w_st s_xᵀ s_y,
//   dx_i = g/ρ_i (v − [r_i > eps] (x̂_iᵀ v) x̂_i) − [unbiased] 2 w_ss g (1 − [r_i > eps] q_i) x_i/ρ_i²,
//   v = 2 w_ss s_x − 2 w_st s_y (and symmetrically for the teacher).
//
// Overflow: float32 channels with |x| ≳ 1e19/√D have squared norms (the Grams' diagonals)
// past the largest float while their normalised rows, and MMD², are ordinary. A sample whose
// squared row norms exceed max/4 (inf included) is redone on its rows scaled by the power of
// two s = 2^(31 − ilogb(max |x|)) with the floor eps·s (x̂ is unchanged: an exact scaling);
// its state then belongs to the scaled rows and the backward applies the chain rule,
// dX = s·g·(M_ss (sX) + M_st (sY)), from the per-sample scale kept as the fifth output. The
// linear and D × D paths normalise rows themselves and use kdfast::norm_from_sum_sq. NaN and
// ±inf values are never rescued: they give NaN.
//
// Parallel over the batch (at::parallel_for, one sample per task: the GEMMs inside run
// single-threaded); with fewer samples than threads the samples run one after another and the
// GEMMs use the threads instead. Every sum has a fixed order: the results are deterministic.
// Outside the GEMMs the fp32 hot loops (the rbf and poly epilogues, one pass per Gram row, and
// the row loops of the poly-2 D × D path) are compiled for AVX-512 and AVX2 (KDFAST_SIMD_CLONES).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "kdfast/aten_mmd.h"
#include "kdfast/math.h"
#include "kdfast/simd.h"  // KDFAST_SIMD_CLONES: hot loops also built for AVX-512 and AVX2

namespace {

using kdfast::channel_rows;
using kdfast::MmdBlockWeights;
using kdfast::MmdKernelParams;

constexpr int64_t kPanel = 64;  // rows per panel of the symmetric Grams

// Runs body(first, last) over ranges of samples: in parallel over samples when there are
// enough of them, else once over all (the ATen GEMMs inside then use the threads). A task can
// allocate its scratch once per range. Worker threads get the caller's no-autograd guard too
// (it is thread-local), so out= GEMMs on views of inputs that require grad are allowed.
void for_sample_ranges(int64_t batch, const std::function<void(int64_t, int64_t)>& body) {
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
void for_each_sample(int64_t batch, const std::function<void(int64_t)>& body) {
  for_sample_ranges(batch, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) body(b);
  });
}

at::ScalarType acc_type_of(at::ScalarType type) {
  return type == at::kDouble ? at::kDouble : at::kFloat;
}

// One sample's (C, HW) rows in the accumulation dtype (a copy only for fp16/bf16).
at::Tensor sample_rows(const at::Tensor& rows, int64_t b, at::ScalarType acc) {
  return rows.select(0, b).to(acc);
}

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

using Result = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Result gram_forward(const at::Tensor& xs, const at::Tensor& ys, const MmdOptions& o,
                    at::ScalarType out_type) {
  const int64_t batch = xs.size(0), m = xs.size(1), n = ys.size(1);
  const auto acc = acc_type_of(xs.scalar_type());
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

Result linear_forward(const at::Tensor& xs, const at::Tensor& ys, const MmdOptions& o,
                      at::ScalarType out_type) {
  const int64_t batch = xs.size(0), m = xs.size(1), n = ys.size(1), d = xs.size(2);
  const auto acc = acc_type_of(xs.scalar_type());
  const auto opts = xs.options().dtype(acc);
  at::Tensor sum_x = at::empty({batch, d}, opts), sum_y = at::empty({batch, d}, opts);
  at::Tensor inv_x = at::empty({batch, m}, opts), inv_y = at::empty({batch, n}, opts);
  const MmdBlockWeights w = kdfast::mmd_block_weights(m, n, o.unbiased, o.teacher_term);
  std::vector<double> values(batch);
  for_each_sample(batch, [&](int64_t b) {
    const double within_x = linear_within(sample_rows(xs, b, acc), o.unbiased, inv_x.select(0, b),
                                          sum_x.select(0, b));
    const double within_y = linear_within(sample_rows(ys, b, acc), o.unbiased, inv_y.select(0, b),
                                          sum_y.select(0, b));
    const double cross = at::dot(sum_x.select(0, b), sum_y.select(0, b)).item<double>();
    values[b] = w.ss * within_x + w.tt * within_y - 2 * w.st * cross;
  });
  at::Tensor loss = at::tensor(values, xs.options().dtype(at::kDouble)).to(acc);
  return {loss, sum_x, sum_y, inv_x, inv_y};
}

// Poly d = 2 through D × D Grams, taken (like the reference) when D < the Gram rows: with
// F = X̂ᵀX̂ and s = Σ x̂_i, Σ_ij (ĝ_ij + c)² = ⟨F_a, F_b⟩ + 2c s_aᵀs_b + c²·rows_a·rows_b, and the
// unbiased within-set sums take Σ_i (q_i + c)² out. The backward of x̂_i is u_i = x̂_i A_x + v_x
// − [unbiased] 4 w_ss (q_i + c) x̂_i with A_x = 4 w_ss F_x − 4 w_st F_y, v_x = 4c (w_ss s_x −
// w_st s_y) (symmetrically for the teacher); state: A (B, 2, D, D), v (B, 2, D), 1/ρ_x, 1/ρ_y.
// Per sample: one GEMM per side in the forward and one per input in the backward, everything
// else in plain loops over a per-task (rows × D) scratch of unit rows (no per-sample ATen
// temporaries: at small maps the GEMMs are only a few microseconds each).
bool use_feature_gram(int kind, int64_t degree, int64_t d, int64_t m, int64_t n,
                      bool teacher_term) {
  return kind == kdfast::kMmdPoly && degree == 2 && d < m + (teacher_term ? n : 0);
}

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
                      at::Tensor a_b, T* v_b, T* inv_x, T* inv_y, const MmdOptions& o,
                      const MmdBlockWeights& w) {
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

Result feature_gram_forward(const at::Tensor& xs, const at::Tensor& ys, const MmdOptions& o) {
  const int64_t batch = xs.size(0), m = xs.size(1), n = ys.size(1), d = xs.size(2);
  const auto acc = acc_type_of(xs.scalar_type());
  const auto opts = xs.options().dtype(acc);
  at::Tensor a = at::empty({batch, 2, d, d}, opts), v = at::empty({batch, 2, d}, opts);
  at::Tensor inv_x = at::empty({batch, m}, opts), inv_y = at::empty({batch, n}, opts);
  const MmdBlockWeights w = kdfast::mmd_block_weights(m, n, o.unbiased, o.teacher_term);
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
                      bool teacher_term, const MmdBlockWeights& w, double coef) {
  const int64_t batch = xs.size(0), m = xs.size(1), n = ys.size(1), d = xs.size(2);
  const auto acc = acc_type_of(xs.scalar_type());
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

Result channel_mmd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                       c10::string_view kernel, int64_t degree, double coef,
                       at::ArrayRef<double> sigma2, bool sigma_mean, bool unbiased,
                       bool teacher_term, bool grad_student, bool grad_teacher) {
  // The ATen calls below are implementation details: no autograd recording through them.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(),
              "student and teacher must have one dtype, got ", student.scalar_type(), " and ",
              teacher.scalar_type());
  TORCH_CHECK(at::isFloatingType(student.scalar_type()), "features must be floating point");
  const at::Tensor xs = channel_rows(student), ys = channel_rows(teacher);
  TORCH_CHECK(xs.size(0) == ys.size(0) && xs.size(2) == ys.size(2),
              "student and teacher must share B, H and W, got ", student.sizes(), " and ",
              teacher.sizes());
  TORCH_CHECK(degree >= 1, "degree must be >= 1, got ", degree);
  TORCH_CHECK(sigma_mean || !sigma2.empty(), "sigma2 must hold at least one bandwidth");
  TORCH_CHECK(static_cast<int64_t>(sigma2.size()) <= kdfast::kMmdMaxBandwidths,
              "at most ", kdfast::kMmdMaxBandwidths, " bandwidths, got ", sigma2.size());
  for (double s : sigma2) TORCH_CHECK(s > 0, "every sigma2 must be > 0, got ", s);
  TORCH_CHECK(!unbiased || (xs.size(1) >= 2 && (!teacher_term || ys.size(1) >= 2)),
              "unbiased=True needs at least 2 channels in each set it averages");
  const MmdOptions o{kdfast::mmd_kernel_kind(kernel), degree, coef,
                     std::vector<double>(sigma2.begin(), sigma2.end()),
                     sigma_mean, unbiased, teacher_term, grad_student, grad_teacher};
  if (o.kind == kdfast::kMmdLinear) return linear_forward(xs, ys, o, student.scalar_type());
  if (use_feature_gram(o.kind, degree, xs.size(2), xs.size(1), ys.size(1), teacher_term)) {
    return feature_gram_forward(xs, ys, o);
  }
  return gram_forward(xs, ys, o, student.scalar_type());
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

// The backward's outputs: the gradients in the inputs' shapes, or empty ones where not wanted.
std::tuple<at::Tensor, at::Tensor> gradients_of(const at::Tensor& dx, const at::Tensor& dy,
                                                const at::Tensor& student,
                                                const at::Tensor& teacher) {
  return {dx.defined() ? dx.view(student.sizes()) : at::empty({0}, student.options()),
          dy.defined() ? dy.view(teacher.sizes()) : at::empty({0}, teacher.options())};
}

std::tuple<at::Tensor, at::Tensor> channel_mmd_backward_cpu(
    const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
    const at::Tensor& s0, const at::Tensor& s1, const at::Tensor& s2, const at::Tensor& s3,
    c10::string_view kernel, double coef, bool unbiased, bool teacher_term, bool grad_student,
    bool grad_teacher) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor xs = channel_rows(student), ys = channel_rows(teacher);
  const int64_t batch = xs.size(0), m = xs.size(1), n = ys.size(1);
  const auto acc = acc_type_of(xs.scalar_type());
  const at::Tensor g = grad.to(at::kDouble).contiguous();
  const double* gp = g.data_ptr<double>();
  at::Tensor dx, dy;
  if (grad_student) dx = at::empty(xs.sizes(), xs.options().memory_format(at::MemoryFormat::Contiguous));
  if (grad_teacher) dy = at::empty(ys.sizes(), ys.options().memory_format(at::MemoryFormat::Contiguous));
  const bool linear = kdfast::mmd_kernel_kind(kernel) == kdfast::kMmdLinear;
  const bool feature = !linear && s0.dim() == 4;  // the D × D poly-2 state
  const MmdBlockWeights w = kdfast::mmd_block_weights(m, n, unbiased, teacher_term);
  if (feature) {
    feature_backward(dx, dy, xs, ys, s0, s1, s2.contiguous(), s3.contiguous(), gp, unbiased,
                     teacher_term, w, coef);
  }
  if (feature) return gradients_of(dx, dy, student, teacher);
  const at::Tensor scales =
      !linear && s3.numel() == batch ? s3.to(at::kDouble).contiguous() : at::Tensor();
  for_each_sample(batch, [&](int64_t b) {
    const at::Tensor x = sample_rows(xs, b, acc), y = sample_rows(ys, b, acc);
    if (linear) {
      const at::Tensor sx = s0.select(0, b), sy = s1.select(0, b);
      if (grad_student) {
        const at::Tensor v = 2 * w.ss * sx - 2 * w.st * sy;
        linear_rows_grad(dx.select(0, b), x, s2.select(0, b), v, gp[b], unbiased, w.ss);
      }
      if (grad_teacher) {
        const at::Tensor v = 2 * w.tt * sy - 2 * w.st * sx;
        linear_rows_grad(dy.select(0, b), y, s3.select(0, b), v, gp[b],
                         unbiased && teacher_term, w.tt);
      }
      return;
    }
    // s3: the per-sample scale of the rows the M matrices belong to (1 unless the forward
    // rescued an overflowing sample): dX = s·g·(M_ss (s X) + M_st (s Y)), likewise dY.
    const double scale = scales.defined() ? scales.const_data_ptr<double>()[b] : 1.0;
    const at::Tensor xr = scale == 1.0 ? x : x * scale, yr = scale == 1.0 ? y : y * scale;
    if (grad_student) {
      two_gemms(dx.select(0, b), s0.select(0, b), xr, s1.select(0, b), yr, gp[b] * scale);
    }
    if (grad_teacher) {
      two_gemms(dy.select(0, b), s2.select(0, b), yr, s1.select(0, b).t(), xr, gp[b] * scale);
    }
  });
  return gradients_of(dx, dy, student, teacher);
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("channel_mmd", &channel_mmd_cpu);
  m.impl("channel_mmd_backward", &channel_mmd_backward_cpu);
}
