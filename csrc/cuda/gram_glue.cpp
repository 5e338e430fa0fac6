// Torch-facing side of the CUDA batch-Gram epilogues (the GEMMs run through ATen/cuBLAS in
// kdfast/ops/gram.py): checks, allocation in the accumulation type, the current stream and
// the CUDA registrations of kdfast::similarity_forward/_backward.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include "kdfast/aten_dtype.h"
#include "gram.h"

namespace {

at::Tensor as_acc(const at::Tensor& x) { return x.to(kdfast::accumulation_type(x)).contiguous(); }

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> similarity_forward_cuda(
    const at::Tensor& gram_s, const at::Tensor& gram_t) {
  TORCH_CHECK(gram_s.dim() == 2 && gram_s.size(0) == gram_s.size(1) &&
                  gram_t.sizes() == gram_s.sizes(),
              "similarity_forward: grams must both be B x B, got ", gram_s.sizes(), " and ",
              gram_t.sizes());
  const c10::cuda::CUDAGuard guard(gram_s.device());
  const at::Tensor a_s = as_acc(gram_s), a_t = as_acc(gram_t.to(gram_s.scalar_type()));
  const int64_t n = a_s.size(0);
  at::Tensor g_s = at::empty_like(a_s), g_t = at::empty_like(a_s);
  at::Tensor norm_s = at::empty({n}, a_s.options()), norm_t = at::empty({n}, a_s.options());
  at::Tensor loss = at::empty({n}, a_s.options());
  if (n == 0) return {loss, g_s, g_t, norm_s, norm_t};
  kdfast::cuda::similarity_forward(a_s.scalar_type() == at::kDouble, a_s.const_data_ptr(),
                                   a_t.const_data_ptr(), n, g_s.mutable_data_ptr(),
                                   g_t.mutable_data_ptr(), norm_s.mutable_data_ptr(),
                                   norm_t.mutable_data_ptr(), loss.mutable_data_ptr(), stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, g_s, g_t, norm_s, norm_t};
}

std::tuple<at::Tensor, at::Tensor> similarity_backward_cuda(
    const at::Tensor& grad, const at::Tensor& g_s, const at::Tensor& g_t,
    const at::Tensor& norm_s, const at::Tensor& norm_t, bool student, bool teacher) {
  const c10::cuda::CUDAGuard guard(g_s.device());
  const int64_t n = g_s.size(0);
  const bool is_double = g_s.scalar_type() == at::kDouble;
  const at::Tensor grad_acc = grad.to(g_s.scalar_type()).contiguous();
  at::Tensor da = at::empty_like(g_s);
  at::Tensor w_s = at::empty({student ? n : 0, n}, g_s.options());
  at::Tensor w_t = at::empty({teacher ? n : 0, n}, g_s.options());
  if (n == 0) return {w_s, w_t};
  if (student) {
    kdfast::cuda::similarity_backward(is_double, grad_acc.const_data_ptr(), g_s.const_data_ptr(),
                                      g_t.const_data_ptr(), norm_s.const_data_ptr(), -1.0, n,
                                      da.mutable_data_ptr(), w_s.mutable_data_ptr(), stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (teacher) {
    kdfast::cuda::similarity_backward(is_double, grad_acc.const_data_ptr(), g_s.const_data_ptr(),
                                      g_t.const_data_ptr(), norm_t.const_data_ptr(), 1.0, n,
                                      da.mutable_data_ptr(), w_t.mutable_data_ptr(), stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {w_s, w_t};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("similarity_forward", &similarity_forward_cuda);
  m.impl("similarity_backward", &similarity_backward_cuda);
}
