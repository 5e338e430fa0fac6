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

}  // namespace kdfast
