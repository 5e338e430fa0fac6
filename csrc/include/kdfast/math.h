// Inline math shared by the CPU (C++) and CUDA kernels: kernel functions and their
// derivatives. Plain C++ with no torch headers, so nvcc compiles it with the toolkit alone.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define KDFAST_HD __host__ __device__ __forceinline__
#else
#define KDFAST_HD inline
#endif

namespace kdfast {

// Normalisation floor, the eps of F.normalize: x / max(||x||, kNormEps).
constexpr double kNormEps = 1e-12;

// ‖v‖₂ of n values v[k·stride] given their plain sum of squares (the caller's hot loop).
// Σ v² overflows long before ‖v‖ does (float: |v| ≳ 1e19/√n; the plain norm is then inf and
// v/‖v‖ silently 0): then the sum is redone on v·2^−e, e = ilogb(max |v|) (an exact scaling),
// and the root scaled back by 2^e, so the norm is finite whenever every value is. A NaN or
// ±inf value gives NaN or inf, as the plain formula does.
template <typename T>
KDFAST_HD T norm_from_sum_sq(T sum_sq, const T* v, long long n, long long stride) {
  if (!std::isinf(sum_sq)) return std::sqrt(sum_sq);
  T peak = T(0);
  for (long long k = 0; k < n; ++k) {
    const T a = std::fabs(v[k * stride]);
    peak = a > peak ? a : peak;
  }
  if (!std::isfinite(peak)) return sum_sq;
  const int e = std::ilogb(peak);
  T scaled = T(0);
  for (long long k = 0; k < n; ++k) {
    const T u = std::ldexp(v[k * stride], -e);
    scaled += u * u;
  }
  return std::ldexp(std::sqrt(scaled), e);
}

// |v|^p with the two common exponents special-cased so the compiler can vectorise them.
template <typename T>
KDFAST_HD T abs_pow(T v, T p) {
  const T a = v < T(0) ? -v : v;
  if (p == T(2)) return a * a;
  if (p == T(1)) return a;
  return std::pow(a, p);
}

// d|v|^p / dv = p |v|^(p-1) sign(v); 0 at v = 0 (for p >= 1 the subgradient torch uses).
template <typename T>
KDFAST_HD T abs_pow_grad(T v, T p) {
  if (v == T(0)) return T(0);
  const T sign = v < T(0) ? T(-1) : T(1);
  if (p == T(2)) return T(2) * v;
  if (p == T(1)) return sign;
  const T a = v < T(0) ? -v : v;
  return p * std::pow(a, p - T(1)) * sign;
}


// ---- Channel MMD (NST) kernels -------------------------------------------------------------
// Every kernel is a function of the unit-row Gram entry g = x̂ᵀŷ and the squared norms of the
// two normalised rows, q_a = ‖x̂‖², q_b = ‖ŷ‖² (1, or 0 for an all-zero channel):
//   linear  φ = g
//   poly    φ = (g + c)^d
//   rbf     φ = Σ_s exp(−max(q_a + q_b − 2g, 0) · h_s),   h_s = 1 / (2σ_s²)
// mmd_kernel returns φ and writes φ′ = dφ/dg (0 where the rbf distance is clamped).
enum MmdKernelKind : int { kMmdLinear = 0, kMmdPoly = 1, kMmdRbf = 2 };

constexpr int kMmdMaxBandwidths = 16;

template <typename T>
struct MmdKernelParams {
  int kind;
  int degree;
  T coef;
  int num_bandwidths;
  T half_inv_sigma2[kMmdMaxBandwidths];  // h_s = 1 / (2σ_s²)
};

template <typename T>
KDFAST_HD T int_pow(T base, int exponent) {
  T result = T(1);
  for (int i = 0; i < exponent; ++i) result *= base;
  return result;
}

template <int Kind, typename T>
KDFAST_HD T mmd_kernel_of(const MmdKernelParams<T>& params, T g, T q_a, T q_b, T* derivative) {
  if (Kind == kMmdLinear) {
    *derivative = T(1);
    return g;
  }
  if (Kind == kMmdPoly) {
    const T base = g + params.coef;
    const T lower = int_pow(base, params.degree - 1);
    *derivative = T(params.degree) * lower;
    return lower * base;
  }
  // Clamped with comparisons that keep a NaN distance NaN (a non-finite input must give NaN).
  T dist = q_a + q_b - T(2) * g;
  const bool clamped = dist < T(0);
  dist = clamped ? T(0) : dist;
  T value = T(0), slope = T(0);
  for (int s = 0; s < params.num_bandwidths; ++s) {
    const T e = std::exp(-dist * params.half_inv_sigma2[s]);
    value += e;
    slope += T(2) * params.half_inv_sigma2[s] * e;
  }
  *derivative = clamped ? T(0) : slope;
  return value;
}

// The same with the kind chosen at run time (the CUDA kernels and tests use this one).
template <typename T>
KDFAST_HD T mmd_kernel(const MmdKernelParams<T>& params, T g, T q_a, T q_b, T* derivative) {
  if (params.kind == kMmdLinear) return mmd_kernel_of<kMmdLinear>(params, g, q_a, q_b, derivative);
  if (params.kind == kMmdPoly) return mmd_kernel_of<kMmdPoly>(params, g, q_a, q_b, derivative);
  return mmd_kernel_of<kMmdRbf>(params, g, q_a, q_b, derivative);
}

// Weights of the three block sums: MMD² = ss·Σ_ss φ + tt·Σ_tt φ − 2·st·Σ_st φ, where the
// unbiased within-set sums skip the diagonal and the teacher term may be dropped (tt = 0).
struct MmdBlockWeights {
  double ss, st, tt;
};

KDFAST_HD MmdBlockWeights mmd_block_weights(long long m, long long n, bool unbiased,
                                            bool teacher_term) {
  MmdBlockWeights w;
  w.ss = 1.0 / (unbiased ? double(m) * double(m - 1) : double(m) * double(m));
  w.st = 1.0 / (double(m) * double(n));
  w.tt = teacher_term ? 1.0 / (unbiased ? double(n) * double(n - 1) : double(n) * double(n))
                      : 0.0;
  return w;
}

// σ² of sigma2="mean": the mean squared distance over ordered pairs of distinct rows of the
// pooled normalised rows Z = [X̂; Ŷ] (N = m + n), from Σ‖z_i‖² and ‖Σ z_i‖² (the sum of all
// entries of ZZᵀ), floored at kNormEps like the reference.
KDFAST_HD double mmd_mean_bandwidth(double sum_sq_norms, double sum_all_gram, long long rows) {
  const double total = 2.0 * double(rows) * sum_sq_norms - 2.0 * sum_all_gram;
  const double mean = total / (double(rows) * double(rows - 1));
  return mean < kNormEps ? kNormEps : mean;  // a NaN mean stays NaN
}
}  // namespace kdfast
