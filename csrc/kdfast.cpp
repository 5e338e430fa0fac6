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
  // SP epilogue of the B x B grams A = Q Q^T: per-row loss sum_j (G_t - G_s)_ij^2 / B with
  // G = rownormalise(A), and G_s, G_t, ||A_s row||, ||A_t row|| for the backward.
  m.def("similarity_forward(Tensor gram_s, Tensor gram_t) -> (Tensor, Tensor, Tensor, Tensor, "
        "Tensor)");
  // S = dA + dA^T per side (0 x B when not requested) so that dQ = S Q.
  m.def("similarity_backward(Tensor grad, Tensor g_s, Tensor g_t, Tensor norm_s, "
        "Tensor norm_t, bool student, bool teacher) -> (Tensor, Tensor)");
  // FSP epilogue of the products P = X_a X_b^T: with G = scale P per side, the per-sample
  // mean((G_s - G_t)^2) and the difference G_s - G_t.
  m.def("fsp_forward(Tensor prod_s, Tensor prod_t, float scale_s, float scale_t) -> "
        "(Tensor, Tensor)");
  // Channel MMD (NST), per sample MMD² (B,) in the accumulation dtype, and the state the
  // backward needs: (M_ss, M_st, M_tt, s) for poly/rbf (M 0-element where no gradient is
  // wanted; s (B,) the scale of the rows the M belong to, 1 unless a sample whose squared
  // channel norms overflow was redone on rows scaled by s), or (Σ x̂, Σ ŷ, 1/ρ_x, 1/ρ_y) for
  // linear. sigma2 is ignored when sigma_mean.
  m.def("channel_mmd(Tensor student, Tensor teacher, str kernel, int degree, float coef, "
        "float[] sigma2, bool sigma_mean, bool unbiased, bool teacher_term, bool grad_student, "
        "bool grad_teacher) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("channel_mmd_backward(Tensor grad, Tensor student, Tensor teacher, Tensor s0, "
        "Tensor s1, Tensor s2, Tensor s3, str kernel, float coef, bool unbiased, bool teacher_term, "
        "bool grad_student, bool grad_teacher) -> (Tensor, Tensor)");
  // Row-wise softmax divergence of (N, L) logits softened by T (divergence forward | reverse
  // | jsd with beta): the per-row loss T² D (N,) and dL/ds, dL/dt (N, L), contiguous (0 x 0
  // where not requested), all in the accumulation dtype.
  m.def("softmax_kl(Tensor student, Tensor teacher, float temperature, str divergence, "
        "float beta, bool grad_student, bool grad_teacher) -> (Tensor, Tensor, Tensor)");
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
