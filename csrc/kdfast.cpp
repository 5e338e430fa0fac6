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
  // The per-sample AT loss (B,) of student and teacher features of equal B, H, W and dtype
  // (mode "code": mean_HW (q_s - q_t)^2; paper: ||q_s - q_t||), with both maps and norms for
  // the backward. CPU only (other devices run the two maps and the epilogue in torch).
  m.def("attention_loss(Tensor student, Tensor teacher, float p, bool paper) -> (Tensor loss, "
        "Tensor q_student, Tensor norm_student, Tensor q_teacher, Tensor norm_teacher)");
  // (d student, d teacher) from d loss (B,); 0-element where not requested.
  m.def("attention_loss_backward(Tensor grad, Tensor student, Tensor teacher, "
        "Tensor q_student, Tensor norm_student, Tensor q_teacher, Tensor norm_teacher, float p, "
        "bool paper, bool grad_student, bool grad_teacher) -> (Tensor, Tensor)");
  // SP epilogue of the B x B grams A = Q Q^T: per-row loss sum_j (G_t - G_s)_ij^2 / B with
  // G = rownormalise(A), and G_s, G_t, ||A_s row||, ||A_t row|| for the backward.
  m.def("similarity_forward(Tensor gram_s, Tensor gram_t) -> (Tensor, Tensor, Tensor, Tensor, "
        "Tensor)");
  // S = dA + dA^T per side (0 x B when not requested) so that dQ = S Q.
  m.def("similarity_backward(Tensor grad, Tensor g_s, Tensor g_t, Tensor norm_s, "
        "Tensor norm_t, bool student, bool teacher) -> (Tensor, Tensor)");
  // Channel MMD (NST): three algorithms, one operator pair each. kdfast/ops/mmd.py's
  // channel_mmd_path picks one (docs/design.md, "Channel MMD"). Each forward returns the
  // per-sample MMD² (B,) in the accumulation dtype and the four tensors its backward takes;
  // each backward returns (d student, d teacher), 0-element where not requested.
  //
  // C × C Gram of the channels (poly, rbf): m_ss (B, m, m), m_st (B, m, n), m_tt (B, n, n)
  // are the backward's matrices, dX = g (M_ss X + M_st Y) (m_ss / m_tt 0-element where that
  // gradient is not requested); row_scale (B,) the scale of the rows the M belong to (1 unless
  // the CPU kernel redid a sample whose squared channel norms overflow on rows scaled by it).
  // sigma2 is ignored when sigma_mean.
  m.def("channel_mmd_gram(Tensor student, Tensor teacher, str kernel, int degree, float coef, "
        "float[] sigma2, bool sigma_mean, bool unbiased, bool teacher_term, bool grad_student, "
        "bool grad_teacher) -> (Tensor loss, Tensor m_ss, Tensor m_st, Tensor m_tt, "
        "Tensor row_scale)");
  m.def("channel_mmd_gram_backward(Tensor grad, Tensor student, Tensor teacher, Tensor m_ss, "
        "Tensor m_st, Tensor m_tt, Tensor row_scale, bool grad_student, bool grad_teacher) -> "
        "(Tensor, Tensor)");
  // D × D feature Gram (poly, degree 2, on maps smaller than the Gram rows; CPU only):
  // feature_weights (B, 2, D, D) = [A_x; A_y] and feature_offsets (B, 2, D) = [v_x; v_y] of
  // the unit rows' backward u_i = x̂_i A + v − ..., inv_norm_x (B, m), inv_norm_y (B, n) = 1/ρ.
  m.def("channel_mmd_feature_gram(Tensor student, Tensor teacher, float coef, bool unbiased, "
        "bool teacher_term) -> (Tensor loss, Tensor feature_weights, Tensor feature_offsets, "
        "Tensor inv_norm_x, Tensor inv_norm_y)");
  m.def("channel_mmd_feature_gram_backward(Tensor grad, Tensor student, Tensor teacher, "
        "Tensor feature_weights, Tensor feature_offsets, Tensor inv_norm_x, Tensor inv_norm_y, "
        "float coef, bool unbiased, bool teacher_term, bool grad_student, bool grad_teacher) -> "
        "(Tensor, Tensor)");
  // Linear kernel, no Gram: sum_x = Σ_i x̂_i (B, D), sum_y = Σ_j ŷ_j (B, D), inv_norm_x (B, m),
  // inv_norm_y (B, n) = 1/ρ.
  m.def("channel_mmd_linear(Tensor student, Tensor teacher, bool unbiased, bool teacher_term) "
        "-> (Tensor loss, Tensor sum_x, Tensor sum_y, Tensor inv_norm_x, Tensor inv_norm_y)");
  m.def("channel_mmd_linear_backward(Tensor grad, Tensor student, Tensor teacher, Tensor sum_x, "
        "Tensor sum_y, Tensor inv_norm_x, Tensor inv_norm_y, bool unbiased, bool teacher_term, "
        "bool grad_student, bool grad_teacher) -> (Tensor, Tensor)");
  // Row-wise softmax divergence of (N, L) logits softened by T (divergence forward | reverse
  // | jsd with beta): the per-row loss T² D (N,) and dL/ds, dL/dt (N, L), contiguous (0 x 0
  // where not requested), all in the accumulation dtype (the fused linear KD's per-chunk
  // loss and gradient).
  m.def("softmax_kl(Tensor student, Tensor teacher, float temperature, str divergence, "
        "float beta, bool grad_student, bool grad_teacher) -> (Tensor, Tensor, Tensor)");
  // The recomputing pair (CPU and CUDA; the autograd path of the core): the forward keeps nothing of row size but returns per row
  // the loss (N,) and row_stats (N, 6) (both softmax normalisers and the divergence sums, in
  // the accumulation dtype); the backward rereads the inputs once and returns (d student,
  // d teacher) (N, L) scaled per row by grad (N,), contiguous, in the inputs' dtype (0 x 0
  // where not requested).
  m.def("softmax_kl_with_stats(Tensor student, Tensor teacher, float temperature, "
        "str divergence, float beta) -> (Tensor loss, Tensor row_stats)");
  m.def("softmax_kl_backward(Tensor grad, Tensor student, Tensor teacher, Tensor row_stats, "
        "float temperature, str divergence, float beta, bool grad_student, bool grad_teacher) "
        "-> (Tensor, Tensor)");
  // Decoupled KD (CPU): per row with the gold class targets[r], T² (α TCKD + β NCKD) (N,) and
  // dL/d student (N, C) (0 x 0 where not requested), both in the accumulation dtype.
  m.def("dkd(Tensor student, Tensor teacher, Tensor targets, float temperature, float alpha, "
        "float beta, bool grad_student) -> (Tensor, Tensor)");
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
