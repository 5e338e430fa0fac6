// Torch-facing side of the CUDA softmax-divergence kernel: checks, allocation, the current
// stream and the CUDA registration of kdfast::softmax_kl.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include <string>

#include "softmax_kl.h"

namespace {

using kdfast::cuda::DType;
using kdfast::cuda::SoftmaxDivergence;

DType kernel_dtype(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return DType::kF32;
    case at::kDouble: return DType::kF64;
    case at::kHalf: return DType::kF16;
    case at::kBFloat16: return DType::kBF16;
    default: TORCH_CHECK(false, "kdfast softmax_kl: unsupported dtype ", x.scalar_type());
  }
}

SoftmaxDivergence parse_divergence(c10::string_view name, double beta) {
  TORCH_CHECK(beta >= 0.0 && beta <= 1.0, "softmax_kl: beta must be in [0, 1], got ", beta);
  if (name == "forward") return SoftmaxDivergence::kForward;
  if (name == "reverse") return SoftmaxDivergence::kReverse;
  TORCH_CHECK(name == "jsd", "softmax_kl: divergence must be forward, reverse or jsd, got ",
              std::string(name));
  if (beta == 0.0) return SoftmaxDivergence::kForward;
  if (beta == 1.0) return SoftmaxDivergence::kReverse;
  return SoftmaxDivergence::kJsd;
}

at::Tensor unit_column_stride(const at::Tensor& x) {
  return x.size(1) <= 1 || x.stride(1) == 1 ? x : x.contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_kl_cuda(
    const at::Tensor& student, const at::Tensor& teacher, double temperature,
    c10::string_view divergence, double beta, bool grad_student, bool grad_teacher) {
  TORCH_CHECK(student.dim() == 2 && student.sizes() == teacher.sizes(),
              "softmax_kl: student and teacher must be (N, L) of one shape, got ",
              student.sizes(), " and ", teacher.sizes());
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(),
              "softmax_kl: student and teacher must share one dtype");
  TORCH_CHECK(student.is_cuda() && teacher.device() == student.device(),
              "softmax_kl: student and teacher must be on one CUDA device");
  TORCH_CHECK(temperature > 0.0, "softmax_kl: temperature must be > 0, got ", temperature);
  const SoftmaxDivergence kind = parse_divergence(divergence, beta);
  const c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor s = unit_column_stride(student), t = unit_column_stride(teacher);
  const int64_t rows = s.size(0), cols = s.size(1);
  TORCH_CHECK(rows <= 0x7fffffff, "softmax_kl: at most 2^31 - 1 rows, got ", rows);
  const auto options = s.options().dtype(s.scalar_type() == at::kDouble ? at::kDouble
                                                                        : at::kFloat);
  at::Tensor loss = at::empty({rows}, options);
  at::Tensor gs = at::empty({grad_student ? rows : 0, grad_student ? cols : 0}, options);
  at::Tensor gt = at::empty({grad_teacher ? rows : 0, grad_teacher ? cols : 0}, options);
  if (rows == 0) return {loss, gs, gt};
  if (cols == 0) return {loss.zero_(), gs, gt};
  kdfast::cuda::softmax_kl_forward(
      kernel_dtype(s), s.const_data_ptr(), t.const_data_ptr(), rows, cols, s.stride(0),
      t.stride(0), temperature, kind, beta, loss.mutable_data_ptr(),
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
