// Torch-facing side of the CUDA channel MMD (NST): checks, the Grams and the backward GEMMs
// through ATen (cuBLAS, fp16/bf16 Grams accumulated and returned in fp32), allocation, the
// current stream, and the CUDA registrations of two of the three channel-MMD operators
// (schemas in csrc/kdfast.cpp, math in docs/design.md, "Channel MMD"):
//   channel_mmd_gram(_backward): saves (m_ss, m_st, m_tt, row_scale = 1), as
//     csrc/cpu/mmd_gram.cpp does;
//   channel_mmd_linear(_backward): saves (sum_x, sum_y, inv_norm_x, inv_norm_y), as
//     csrc/cpu/mmd_linear.cpp does.
// channel_mmd_feature_gram has no CUDA kernel: kdfast/ops/mmd.py runs that path on CUDA
// through torch matmuls (feature_gram_channel_mmd).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "kdfast/aten_dtype.h"
#include "kdfast/aten_mmd.h"
#include "kdfast/math.h"
#include "mmd.h"

namespace {

using Result = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

void* stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// The checks of every channel-MMD operator (kdfast::checked_channel_rows) on CUDA tensors.
std::pair<at::Tensor, at::Tensor> cuda_channel_rows(const at::Tensor& student,
                                                    const at::Tensor& teacher, bool unbiased,
                                                    bool teacher_term) {
  TORCH_CHECK(student.is_cuda() && teacher.is_cuda(), "features must be CUDA tensors");
  return kdfast::checked_channel_rows(student, teacher, unbiased, teacher_term);
}

// a bᵀ per sample in the accumulation dtype (fp16/bf16 inputs: cuBLAS accumulates in fp32 and
// writes fp32).
at::Tensor gram(const at::Tensor& a, const at::Tensor& b, at::ScalarType acc) {
  if (a.scalar_type() == acc) return at::bmm(a, b.transpose(1, 2));
  return at::bmm(a, b.transpose(1, 2), acc);
}

at::Tensor in_acc(const at::Tensor& x, at::ScalarType acc) {
  return x.scalar_type() == acc ? x : x.to(acc);
}

at::Tensor empty_state(const at::Tensor& like) { return at::empty({0}, like.options()); }

Result linear_forward(const at::Tensor& student, const at::Tensor& teacher, bool unbiased,
                      bool teacher_term) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const c10::cuda::CUDAGuard guard(student.device());
  const auto rows = cuda_channel_rows(student, teacher, unbiased, teacher_term);
  const at::Tensor &xs = rows.first, &ys = rows.second;
  const auto acc = kdfast::accumulation_type(xs);
  const int64_t m = xs.size(1), n = ys.size(1);
  const kdfast::MmdBlockWeights w = kdfast::mmd_block_weights(m, n, unbiased, teacher_term);
  auto side = [&](const at::Tensor& z) {
    const at::Tensor r = at::linalg_vector_norm(z, 2, {2}, false, acc);
    const at::Tensor rho = r.clamp_min(kdfast::kNormEps);
    const at::Tensor inv = rho.reciprocal();
    const at::Tensor sum = at::bmm(inv.unsqueeze(1), in_acc(z, acc)).squeeze(1);
    at::Tensor within = sum.square().sum(1);
    if (unbiased) within = within - (r / rho).square().sum(1);
    return std::make_tuple(inv, sum, within);
  };
  auto [inv_x, sum_x, within_x] = side(xs);
  auto [inv_y, sum_y, within_y] = side(ys);
  const at::Tensor loss = w.ss * within_x + w.tt * within_y - 2 * w.st * (sum_x * sum_y).sum(1);
  return {loss, sum_x, sum_y, inv_x, inv_y};
}

Result gram_forward(const at::Tensor& xs, const at::Tensor& ys, int kind, int64_t degree,
                    double coef, at::ArrayRef<double> sigma2, bool sigma_mean, bool unbiased,
                    bool teacher_term, bool grad_student, bool grad_teacher) {
  const auto acc = kdfast::accumulation_type(xs);
  const int64_t batch = xs.size(0), m = xs.size(1), n = ys.size(1);
  const auto opts = xs.options().dtype(acc);
  const at::Tensor g_ss = gram(xs, xs, acc).contiguous();
  const at::Tensor g_st = gram(xs, ys, acc).contiguous();
  at::Tensor g_tt;
  if (teacher_term) g_tt = gram(ys, ys, acc).contiguous();
  at::Tensor stats_x = at::empty({3, batch, m}, opts), stats_y = at::empty({3, batch, n}, opts);
  at::Tensor squares_y;
  if (!teacher_term) squares_y = at::linalg_vector_norm(ys, 2, {2}, false, acc).square();
  at::Tensor m_ss = grad_student ? at::empty({batch, m, m}, opts) : empty_state(g_ss);
  at::Tensor m_st = at::empty({batch, m, n}, opts);
  at::Tensor m_tt = grad_teacher ? at::empty({batch, n, n}, opts) : empty_state(g_ss);
  at::Tensor partials = at::empty({batch, m + n, 3}, opts);
  at::Tensor loss = at::empty({batch}, opts);
  AT_DISPATCH_FLOATING_TYPES(acc, "channel_mmd_cuda", [&] {
    using T = scalar_t;
    T* inv_x = stats_x[0].data_ptr<T>();
    T* sq_x = stats_x[1].data_ptr<T>();
    T* live_x = stats_x[2].data_ptr<T>();
    T* inv_y = stats_y[0].data_ptr<T>();
    T* sq_y = stats_y[1].data_ptr<T>();
    T* live_y = stats_y[2].data_ptr<T>();
    kdfast::cuda::mmd_row_norms<T>(g_ss.data_ptr<T>(), batch, m, m * m, m + 1, inv_x, sq_x,
                                   live_x, stream());
    if (teacher_term) {
      kdfast::cuda::mmd_row_norms<T>(g_tt.data_ptr<T>(), batch, n, n * n, n + 1, inv_y, sq_y,
                                     live_y, stream());
    } else {
      const at::Tensor sq = squares_y.contiguous();
      kdfast::cuda::mmd_row_norms<T>(sq.data_ptr<T>(), batch, n, n, 1, inv_y, sq_y, live_y,
                                     stream());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor half_inv;
    if (sigma_mean) {
      at::Tensor teacher_sum;
      if (!teacher_term) {  // ‖Σ ŷ‖² from one pass over Y (no teacher Gram)
        teacher_sum = at::bmm(stats_y[0].unsqueeze(1), in_acc(ys, acc)).square().sum({1, 2});
      }
      at::Tensor row_sums = at::empty({batch, m + n}, opts);
      half_inv = at::empty({batch}, opts);
      kdfast::cuda::mmd_mean_bandwidth<T>(
          g_ss.data_ptr<T>(), g_st.data_ptr<T>(), teacher_term ? g_tt.data_ptr<T>() : nullptr,
          teacher_term ? nullptr : teacher_sum.data_ptr<T>(), inv_x, sq_x, inv_y, sq_y, batch,
          m, n, row_sums.data_ptr<T>(), half_inv.data_ptr<T>(), stream());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    kdfast::MmdKernelParams<T> p{};
    p.kind = kind;
    p.degree = static_cast<int>(degree);
    p.coef = static_cast<T>(coef);
    p.num_bandwidths = static_cast<int>(sigma2.size());
    for (size_t s = 0; s < sigma2.size(); ++s) p.half_inv_sigma2[s] = T(0.5 / sigma2[s]);
    kdfast::cuda::mmd_epilogue<T>(
        g_ss.data_ptr<T>(), g_st.data_ptr<T>(), teacher_term ? g_tt.data_ptr<T>() : nullptr,
        inv_x, sq_x, live_x, inv_y, sq_y, live_y, p,
        sigma_mean ? half_inv.data_ptr<T>() : nullptr, batch, m, n, unbiased, teacher_term,
        grad_student ? m_ss.data_ptr<T>() : nullptr, m_st.data_ptr<T>(),
        grad_teacher ? m_tt.data_ptr<T>() : nullptr, partials.data_ptr<T>(),
        loss.data_ptr<T>(), stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // The row scale of each sample (see kdfast.cpp): always 1 here. The CPU kernels redo a
  // sample whose squared channel norms overflow on scaled rows; deciding that on the host
  // needs a device sync, so CUDA keeps the NaN such a sample gives.
  return {loss, m_ss, m_st, m_tt, at::ones({batch}, opts)};
}

Result gram_forward_op(const at::Tensor& student, const at::Tensor& teacher,
                       c10::string_view kernel, int64_t degree, double coef,
                       at::ArrayRef<double> sigma2, bool sigma_mean, bool unbiased,
                       bool teacher_term, bool grad_student, bool grad_teacher) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const c10::cuda::CUDAGuard guard(student.device());
  const auto rows = cuda_channel_rows(student, teacher, unbiased, teacher_term);
  const at::Tensor &xs = rows.first, &ys = rows.second;
  kdfast::check_gram_kernel_options(degree, sigma2, sigma_mean);
  const int kind = kdfast::mmd_kernel_kind(kernel);
  TORCH_CHECK(kind != kdfast::kMmdLinear,
              "channel_mmd_gram takes poly or rbf; the linear kernel is channel_mmd_linear");
  return gram_forward(xs, ys, kind, degree, coef, sigma2, sigma_mean, unbiased, teacher_term,
                      grad_student, grad_teacher);
}

// Linear gradient rows:
//   g/ρ_i (v − live_i (x̂_iᵀv) x̂_i) − [unbiased] 2 w g (1 − live_i q_i) x_i/ρ_i².
at::Tensor linear_grad(const at::Tensor& z, const at::Tensor& inv, const at::Tensor& v,
                       const at::Tensor& g, bool unbiased, double w, at::ScalarType acc) {
  const at::Tensor za = in_acc(z, acc);
  const at::Tensor sq = at::linalg_vector_norm(z, 2, {2}, false, acc).square();
  const at::Tensor live = (sq.sqrt() > kdfast::kNormEps).to(acc);
  const at::Tensor proj = at::bmm(za, v.unsqueeze(2)).squeeze(2) * inv;
  const at::Tensor gb = g.unsqueeze(1);
  at::Tensor coeff = -gb * live * proj * inv * inv;
  if (unbiased) coeff = coeff - 2 * w * gb * (1 - live * sq * inv * inv) * inv * inv;
  at::Tensor out = za * coeff.unsqueeze(2);
  out.baddbmm_((inv * gb).unsqueeze(2), v.unsqueeze(1));
  return out;
}

// The gradients in the inputs' dtype and shape, or empty ones where not wanted.
std::tuple<at::Tensor, at::Tensor> gradients_or_empty(const at::Tensor& dx, const at::Tensor& dy,
                                                      const at::Tensor& student,
                                                      const at::Tensor& teacher) {
  return {dx.defined() ? dx.to(student.scalar_type()).reshape(student.sizes())
                       : at::empty({0}, student.options()),
          dy.defined() ? dy.to(teacher.scalar_type()).reshape(teacher.sizes())
                       : at::empty({0}, teacher.options())};
}

std::tuple<at::Tensor, at::Tensor> linear_backward_op(
    const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
    const at::Tensor& sum_x, const at::Tensor& sum_y, const at::Tensor& inv_norm_x,
    const at::Tensor& inv_norm_y, bool unbiased, bool teacher_term, bool grad_student,
    bool grad_teacher) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor xs = kdfast::channel_rows(student), ys = kdfast::channel_rows(teacher);
  const auto acc = kdfast::accumulation_type(xs);
  const at::Tensor g = grad.to(acc);
  const kdfast::MmdBlockWeights w =
      kdfast::mmd_block_weights(xs.size(1), ys.size(1), unbiased, teacher_term);
  at::Tensor dx, dy;
  if (grad_student) {
    dx = linear_grad(xs, inv_norm_x, 2 * w.ss * sum_x - 2 * w.st * sum_y, g, unbiased, w.ss,
                     acc);
  }
  if (grad_teacher) {
    dy = linear_grad(ys, inv_norm_y, 2 * w.tt * sum_y - 2 * w.st * sum_x, g,
                     unbiased && teacher_term, w.tt, acc);
  }
  return gradients_or_empty(dx, dy, student, teacher);
}

std::tuple<at::Tensor, at::Tensor> gram_backward_op(
    const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
    const at::Tensor& m_ss, const at::Tensor& m_st, const at::Tensor& m_tt,
    const at::Tensor& row_scale, bool grad_student, bool grad_teacher) {
  // row_scale is 1 on CUDA (gram_forward never rescales rows).
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor xs = kdfast::channel_rows(student), ys = kdfast::channel_rows(teacher);
  const auto acc = kdfast::accumulation_type(xs);
  const at::Tensor gb = grad.to(acc).view({-1, 1, 1});
  const at::Tensor xa = in_acc(xs, acc), ya = in_acc(ys, acc);
  const at::Tensor m_st_g = m_st * gb;
  at::Tensor dx, dy;
  if (grad_student) dx = at::bmm(m_ss * gb, xa).baddbmm_(m_st_g, ya);
  if (grad_teacher) dy = at::bmm(m_tt * gb, ya).baddbmm_(m_st_g.transpose(1, 2), xa);
  return gradients_or_empty(dx, dy, student, teacher);
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("channel_mmd_gram", &gram_forward_op);
  m.impl("channel_mmd_gram_backward", &gram_backward_op);
  m.impl("channel_mmd_linear", &linear_forward);
  m.impl("channel_mmd_linear_backward", &linear_backward_op);
}
