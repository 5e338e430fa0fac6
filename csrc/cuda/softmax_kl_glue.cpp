// Torch-facing side of the CUDA softmax-divergence kernel: checks, allocation, the current
// stream and the CUDA registration of kdfast::softmax_kl.
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_kl_cuda(
    const at::Tensor& student, const at::Tensor& teacher, double temperature,
    c10::string_view divergence, double beta, bool grad_student, bool grad_teacher) {
  TORCH_CHECK(student.is_cuda() && teacher.device() == student.device(),
              "softmax_kl: student and teacher must be on one CUDA device");
  const c10::cuda::CUDAGuard guard(student.device());
  const kdfast::LogitRows in = kdfast::logit_rows(student, teacher, temperature, divergence, beta);
  const at::Tensor &s = in.student, &t = in.teacher;
  const Divergence kind = in.divergence;
  const int64_t rows = in.rows, cols = in.cols;
  TORCH_CHECK(rows <= 0x7fffffff, "softmax_kl: at most 2^31 - 1 rows, got ", rows);
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

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("softmax_kl", &softmax_kl_cuda);
}
