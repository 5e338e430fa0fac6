// Torch-facing side of the CUDA attention-map kernels: checks, allocation, the current
// stream and the CUDA registrations of kdfast::attention_map(_backward).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include "attention.h"
#include "kdfast/aten_dtype.h"
#include "kdfast/aten_layout.h"
#include "kernel_dtype.h"

namespace {

using kdfast::cuda::kernel_dtype;

void check_features(const at::Tensor& features, double p) {
  TORCH_CHECK(features.dim() == 4, "features must be (B, C, H, W), got ", features.sizes());
  TORCH_CHECK(features.is_cuda(), "features must be a CUDA tensor");
  TORCH_CHECK(p >= 1.0, "p must be >= 1, got ", p);
}

std::tuple<at::Tensor, at::Tensor> attention_map_cuda(const at::Tensor& features, double p) {
  check_features(features, p);
  const c10::cuda::CUDAGuard guard(features.device());
  at::Tensor x;
  const kdfast::FeatureLayout l = kdfast::layout_or_copy(features, false, &x);
  at::Tensor q = at::empty({l.batch, l.hw}, x.options().dtype(kdfast::accumulation_type(x)));
  at::Tensor norm = at::empty({l.batch}, x.options().dtype(kdfast::accumulation_type(x)));
  if (x.numel() == 0) return {q.zero_(), norm.zero_()};
  kdfast::cuda::attention_map_forward(kernel_dtype(x, "attention_map"), x.const_data_ptr(), l, p,
                                      q.mutable_data_ptr(), norm.mutable_data_ptr(),
                                      c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {q, norm};
}

at::Tensor attention_map_backward_cuda(const at::Tensor& grad_map, const at::Tensor& features,
                                       const at::Tensor& q_hat, const at::Tensor& norm,
                                       double p) {
  check_features(features, p);
  const c10::cuda::CUDAGuard guard(features.device());
  at::Tensor x;
  const kdfast::FeatureLayout l = kdfast::layout_or_copy(features, true, &x);
  at::Tensor grad = at::empty_like(x, at::MemoryFormat::Preserve);
  TORCH_CHECK(grad.strides() == x.strides(), "attention_map_backward: stride mismatch");
  if (x.numel() == 0) return grad;
  const auto acc = kdfast::accumulation_type(x);
  const at::Tensor g = grad_map.to(acc).contiguous();
  const at::Tensor qh = q_hat.to(acc).contiguous();
  const at::Tensor n = norm.to(acc).contiguous();
  at::Tensor grad_q = at::empty({l.batch, l.hw}, x.options().dtype(acc));
  kdfast::cuda::attention_map_backward(kernel_dtype(x, "attention_map"), g.const_data_ptr(),
                                       x.const_data_ptr(), l, qh.const_data_ptr(), n.const_data_ptr(), p,
                                       grad_q.mutable_data_ptr(), grad.mutable_data_ptr(),
                                       c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("attention_map", &attention_map_cuda);
  m.impl("attention_map_backward", &attention_map_backward_cuda);
}
