// kdfast._C: the operator schemas of every fused core (torch.library, namespace "kdfast")
// and a small pybind11 module with build information. The CPU implementations live in
// csrc/cpu/*.cpp and register themselves for the CPU dispatch key; CUDA ones in csrc/cuda.
#include <torch/extension.h>

TORCH_LIBRARY(kdfast, m) {
  // q_hat = normalise_HW(mean_C |features|^p) as (B, HW) in the accumulation dtype, and the
  // norm ||mean_C |features|^p||_2 per sample (B,) that the backward needs.
  m.def("attention_map(Tensor features, float p) -> (Tensor, Tensor)");
  // d features from d q_hat (same strides as features when they are dense).
  m.def("attention_map_backward(Tensor grad_map, Tensor features, Tensor q_hat, Tensor norm, "
        "float p) -> Tensor");
}

static bool built_with_cuda() {
#ifdef KDFAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "kdfast fused kernels (operators registered under torch.ops.kdfast)";
  module.def("built_with_cuda", &built_with_cuda, "True when the CUDA kernels were compiled in");
}
