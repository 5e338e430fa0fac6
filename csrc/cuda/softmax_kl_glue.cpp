// Torch-facing side of the CUDA softmax-divergence kernels: checks, allocation, the current
// stream and the CUDA registration of kdfast::softmax_kl (the fused forward, for the chunked
// fused linear KD) and of the recomputing pair kdfast::softmax_kl_with_stats /
// kdfast::softmax_kl_backward (the autograd path), parallel to csrc/cpu/softmax_kl.cpp.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include "kdfast/aten_dtype.h"
#include "kdfast/aten_softmax_kl.h"
#include "kernel_dtype.h"
#include "softmax_kl.h"

namespace {

using kdfast::Divergence;

// The checked rows of one call on a CUDA device (at most 2^31 - 1: one block per row).
kdfast::LogitRows cuda_logit_rows(const at::Tensor& student, const at::Tensor& teacher,
                                  double temperature, c10::string_view divergence, double beta) {
  TORCH_CHECK(student.is_cuda() && teacher.device() == student.device(),
              "softmax_kl: student and teacher must be on one CUDA device");
  kdfast::LogitRows in = kdfast::logit_rows(student, teacher, temperature, divergence, beta);
  TORCH_CHECK(in.rows <= 0x7fffffff, "softmax_kl: at most 2^31 - 1 rows, got ", in.rows);
  return in;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_kl_cuda(
    const at::Tensor& student, const at::Tensor& teacher, double temperature,
    c10::string_view divergence, double beta, bool grad_student, bool grad_teacher) {
  const kdfast::LogitRows in = cuda_logit_rows(student, teacher, temperature, divergence, beta);
  const c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor &s = in.student, &t = in.teacher;
  const Divergence kind = in.divergence;
  const int64_t rows = in.rows, cols = in.cols;
  const auto options = s.options().dtype(kdfast::accumulation_type(s));
  at::Tensor loss = at::empty({rows}, options);
  at::Tensor gs = kdfast::gradient_or_empty(grad_student, rows, cols, options);
  at::Tensor gt = kdfast::gradient_or_empty(grad_teacher, rows, cols, options);
  if (rows == 0) return {loss, gs, gt};
  if (cols == 0) return {loss.zero_(), gs, gt};
  kdfast::cuda::softmax_kl_forward(
      kdfast::cuda::kernel_dtype(s, "softmax_kl"), s.const_data_ptr(), t.const_data_ptr(), rows,
      cols, s.stride(0), t.stride(0), temperature, kind, beta, loss.mutable_data_ptr(),
      grad_student ? gs.mutable_data_ptr() : nullptr,
      grad_teacher ? gt.mutable_data_ptr() : nullptr,
      c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, gs, gt};
}

// The forward of the recomputing backward: the per-row loss and the RowStats (N, kRowStats).
std::tuple<at::Tensor, at::Tensor> softmax_kl_with_stats_cuda(
    const at::Tensor& student, const at::Tensor& teacher, double temperature,
    c10::string_view divergence, double beta) {
  const kdfast::LogitRows in = cuda_logit_rows(student, teacher, temperature, divergence, beta);
  const c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor &s = in.student, &t = in.teacher;
  const int64_t rows = in.rows, cols = in.cols;
  const auto options = s.options().dtype(kdfast::accumulation_type(s));
  at::Tensor loss = at::zeros({rows}, options);
  at::Tensor stats = at::zeros({rows, kdfast::cuda::kRowStats}, options);
  if (rows == 0 || cols == 0) return {loss, stats};
  kdfast::cuda::softmax_kl_with_stats(
      kdfast::cuda::kernel_dtype(s, "softmax_kl_with_stats"), s.const_data_ptr(),
      t.const_data_ptr(), rows, cols, s.stride(0), t.stride(0), temperature, in.divergence,
      beta, loss.mutable_data_ptr(), stats.mutable_data_ptr(),
      c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, stats};
}

// The backward from the inputs and the forward's RowStats: the gradients scaled by grad[r],
// written once in the inputs' dtype.
std::tuple<at::Tensor, at::Tensor> softmax_kl_backward_cuda(
    const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
    const at::Tensor& row_stats, double temperature, c10::string_view divergence, double beta,
    bool grad_student, bool grad_teacher) {
  const kdfast::LogitRows in = cuda_logit_rows(student, teacher, temperature, divergence, beta);
  const c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor &s = in.student, &t = in.teacher;
  const int64_t rows = in.rows, cols = in.cols;
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == rows && grad.device() == s.device(),
              "softmax_kl_backward: grad must be (N,) on the inputs' device for (N, L) inputs, "
              "got ", grad.sizes());
  const auto acc = kdfast::accumulation_type(s);
  TORCH_CHECK(row_stats.sizes() == at::IntArrayRef({rows, kdfast::cuda::kRowStats}) &&
                  row_stats.scalar_type() == acc && row_stats.device() == s.device(),
              "softmax_kl_backward: row_stats must be softmax_kl_with_stats' (N, ",
              kdfast::cuda::kRowStats, ") in the accumulation dtype, got ", row_stats.sizes());
  const at::Tensor grad_scales = grad.to(acc).contiguous(), stats = row_stats.contiguous();
  at::Tensor gs = kdfast::gradient_or_empty(grad_student, rows, cols, s.options());
  at::Tensor gt = kdfast::gradient_or_empty(grad_teacher, rows, cols, s.options());
  if (rows == 0 || cols == 0 || !(grad_student || grad_teacher)) return {gs, gt};
  kdfast::cuda::softmax_kl_backward(
      kdfast::cuda::kernel_dtype(s, "softmax_kl_backward"), grad_scales.const_data_ptr(),
      s.const_data_ptr(), t.const_data_ptr(), stats.const_data_ptr(), rows, cols, s.stride(0),
      t.stride(0), temperature, in.divergence, beta,
      grad_student ? gs.mutable_data_ptr() : nullptr,
      grad_teacher ? gt.mutable_data_ptr() : nullptr,
      c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {gs, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("softmax_kl", &softmax_kl_cuda);
  m.impl("softmax_kl_with_stats", &softmax_kl_with_stats_cuda);
  m.impl("softmax_kl_backward", &softmax_kl_backward_cuda);
}
