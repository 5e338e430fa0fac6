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
  kdfast::check_softmax_kl_args(student, teacher, temperature);
  TORCH_CHECK(student.is_cuda() && teacher.device() == student.device(),
              "softmax_kl: student and teacher must be on one CUDA device");
  const Divergence kind = kdfast::parse_divergence(divergence, beta);
  const c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor s = kdfast::unit_column_stride(student);
  const at::Tensor t = kdfast::unit_column_stride(teacher);
  const int64_t rows = s.size(0), cols = s.size(1);
  TORCH_CHECK(rows <= 0x7fffffff, "softmax_kl: at most 2^31 - 1 rows, got ", rows);
  const auto options = s.options().dtype(kdfast::accumulation_type(s));
  at::Tensor loss = at::empty({rows}, options);
  at::Tensor gs = at::empty({grad_student ? rows : 0, grad_student ? cols : 0}, options);
  at::Tensor gt = at::empty({grad_teacher ? rows : 0, grad_teacher ? cols : 0}, options);
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
