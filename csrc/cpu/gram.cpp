// SP's batch-Gram epilogue on the CPU (docs/design.md, "Batch Gram"): everything around the
// GEMMs, fused into one loop each. The GEMMs themselves (A = Q Q^T, dQ = S Q) run through
// ATen's BLAS in kdfast/ops/gram.py on raw views of the features (fp32 accumulation for
// fp16/bf16 inputs). FSP needs no epilogue of its own: its difference is the second GEMM's
// beta term and its loss one norm reduction (kdfast/ops/gram.py, NativeFsp).
//
// SP, per row i with n_i = ||A_i||, G_i = A_i / max(n_i, eps), D = G_t - G_s:
//   forward   loss_i = sum_j D_ij^2 / B
//   backward  dG_s = -2 D grad_i / B (dG_t = -dG_s); row-normalise backward
//             dA_i = (dG_i - <dG_i, G_i> G_i) / n_i   (dG_i / eps where n_i <= eps);
//             S = dA + dA^T, so that dQ = S Q is one GEMM.
// Accumulation in fp32 (fp64 for fp64); each task owns its rows: deterministic.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>

#include "kdfast/aten_dtype.h"
#include "kdfast/math.h"

namespace {


// x in the accumulation type, contiguous (a no-op for fp32/fp64 contiguous inputs).
at::Tensor as_acc(const at::Tensor& x) { return x.to(kdfast::accumulation_type(x)).contiguous(); }

template <typename acc_t>
acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += a[j] * b[j];
  return sum;
}

// Row-normalises a (n x n) into g, norms into norm.
template <typename acc_t>
void normalise_row(const acc_t* a, int64_t n, acc_t* g, acc_t* norm) {
  const acc_t r = kdfast::norm_from_sum_sq(dot(a, a, n), a, n, 1);  // finite for finite a
  *norm = r;
  const acc_t inv = acc_t(1) / std::max(r, static_cast<acc_t>(kdfast::kNormEps));
  for (int64_t j = 0; j < n; ++j) g[j] = a[j] * inv;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> similarity_forward_cpu(
    const at::Tensor& gram_s, const at::Tensor& gram_t) {
  TORCH_CHECK(gram_s.dim() == 2 && gram_s.size(0) == gram_s.size(1) &&
                  gram_t.sizes() == gram_s.sizes(),
              "similarity_forward: grams must both be B x B, got ", gram_s.sizes(), " and ",
              gram_t.sizes());
  const at::Tensor a_s = as_acc(gram_s), a_t = as_acc(gram_t.to(gram_s.scalar_type()));
  const int64_t n = a_s.size(0);
  at::Tensor g_s = at::empty_like(a_s), g_t = at::empty_like(a_t);
  at::Tensor norm_s = at::empty({n}, a_s.options()), norm_t = at::empty({n}, a_s.options());
  at::Tensor loss = at::empty({n}, a_s.options());
  AT_DISPATCH_FLOATING_TYPES(a_s.scalar_type(), "similarity_forward", [&] {
    const scalar_t *as = a_s.const_data_ptr<scalar_t>(), *at_ = a_t.const_data_ptr<scalar_t>();
    scalar_t *gs = g_s.mutable_data_ptr<scalar_t>(), *gt = g_t.mutable_data_ptr<scalar_t>();
    scalar_t *ns = norm_s.mutable_data_ptr<scalar_t>(), *nt = norm_t.mutable_data_ptr<scalar_t>();
    scalar_t* out = loss.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, n)),
                     [&](int64_t first, int64_t last) {
      for (int64_t i = first; i < last; ++i) {
        normalise_row(as + i * n, n, gs + i * n, ns + i);
        normalise_row(at_ + i * n, n, gt + i * n, nt + i);
        scalar_t sum = 0;
        for (int64_t j = 0; j < n; ++j) {
          const scalar_t d = gt[i * n + j] - gs[i * n + j];
          sum += d * d;
        }
        out[i] = sum / static_cast<scalar_t>(n);
      }
    });
  });
  return {loss, g_s, g_t, norm_s, norm_t};
}

// dA (row-normalise backward) of one side into da, from dG = sign * 2 D grad_i / B.
template <typename acc_t>
void similarity_row_grad(const acc_t* g_s, const acc_t* g_t, const acc_t* g, const acc_t* norm,
                         const acc_t* grad, acc_t sign, int64_t n, acc_t* da) {
  const acc_t eps = static_cast<acc_t>(kdfast::kNormEps);
  at::parallel_for(0, n, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, n)),
                   [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      const acc_t coef = sign * acc_t(2) * grad[i] / static_cast<acc_t>(n);
      acc_t* row = da + i * n;
      for (int64_t j = 0; j < n; ++j) row[j] = coef * (g_t[i * n + j] - g_s[i * n + j]);
      if (norm[i] > eps) {
        const acc_t along = dot(row, g + i * n, n);
        const acc_t inv = acc_t(1) / norm[i];
        for (int64_t j = 0; j < n; ++j) row[j] = (row[j] - along * g[i * n + j]) * inv;
      } else {
        for (int64_t j = 0; j < n; ++j) row[j] /= eps;
      }
    }
  });
}

// s = da + da^T.
template <typename acc_t>
void symmetrise(const acc_t* da, int64_t n, acc_t* s) {
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) s[i * n + j] = da[i * n + j] + da[j * n + i];
  }
}

std::tuple<at::Tensor, at::Tensor> similarity_backward_cpu(
    const at::Tensor& grad, const at::Tensor& g_s, const at::Tensor& g_t,
    const at::Tensor& norm_s, const at::Tensor& norm_t, bool student, bool teacher) {
  const int64_t n = g_s.size(0);
  const at::Tensor grad_acc = grad.to(g_s.scalar_type()).contiguous();
  at::Tensor da = at::empty_like(g_s);
  at::Tensor w_s = at::empty({student ? n : 0, n}, g_s.options());
  at::Tensor w_t = at::empty({teacher ? n : 0, n}, g_s.options());
  AT_DISPATCH_FLOATING_TYPES(g_s.scalar_type(), "similarity_backward", [&] {
    const scalar_t *gs = g_s.const_data_ptr<scalar_t>(), *gt = g_t.const_data_ptr<scalar_t>();
    const scalar_t* gr = grad_acc.const_data_ptr<scalar_t>();
    scalar_t* d = da.mutable_data_ptr<scalar_t>();
    if (student) {
      similarity_row_grad(gs, gt, gs, norm_s.const_data_ptr<scalar_t>(), gr, scalar_t(-1), n, d);
      symmetrise(d, n, w_s.mutable_data_ptr<scalar_t>());
    }
    if (teacher) {
      similarity_row_grad(gs, gt, gt, norm_t.const_data_ptr<scalar_t>(), gr, scalar_t(1), n, d);
      symmetrise(d, n, w_t.mutable_data_ptr<scalar_t>());
    }
  });
  return {w_s, w_t};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("similarity_forward", &similarity_forward_cpu);
  m.impl("similarity_backward", &similarity_backward_cpu);
}
