// The argument checks of the softmax_kl operators, one spelling for the CPU kernel and the CUDA
// glue (torch-side only, not for .cu files).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <string>

#include "kdfast/divergence.h"

namespace kdfast {

// The divergence named by the schema's string; beta at 0 or 1 is forward or reverse KL.
inline Divergence parse_divergence(c10::string_view name, double beta) {
  TORCH_CHECK(beta >= 0.0 && beta <= 1.0, "softmax_kl: beta must be in [0, 1], got ", beta);
  if (name == "forward") return Divergence::kForward;
  if (name == "reverse") return Divergence::kReverse;
  TORCH_CHECK(name == "jsd", "softmax_kl: divergence must be forward, reverse or jsd, got ",
              std::string(name));
  if (beta == 0.0) return Divergence::kForward;
  if (beta == 1.0) return Divergence::kReverse;
  return Divergence::kJsd;
}

// Two (N, L) logit tensors of one dtype and a positive temperature.
inline void check_softmax_kl_args(const at::Tensor& student, const at::Tensor& teacher,
                                  double temperature) {
  TORCH_CHECK(student.dim() == 2 && student.sizes() == teacher.sizes(),
              "softmax_kl: student and teacher must be (N, L) of one shape, got ",
              student.sizes(), " and ", teacher.sizes());
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(),
              "softmax_kl: student and teacher must share one dtype");
  TORCH_CHECK(temperature > 0.0, "softmax_kl: temperature must be > 0, got ", temperature);
}

// Rows read in place when their entries are contiguous (any row stride), else copied.
inline at::Tensor unit_column_stride(const at::Tensor& x) {
  return x.size(1) <= 1 || x.stride(1) == 1 ? x : x.contiguous();
}

// The (N, L) logit rows of one softmax_kl call: checked, the divergence parsed, each read with
// unit column stride.
struct LogitRows {
  at::Tensor student, teacher;
  Divergence divergence;
  int64_t rows, cols;
};

inline LogitRows logit_rows(const at::Tensor& student, const at::Tensor& teacher,
                            double temperature, c10::string_view divergence, double beta) {
  check_softmax_kl_args(student, teacher, temperature);
  const Divergence kind = parse_divergence(divergence, beta);
  return {unit_column_stride(student), unit_column_stride(teacher), kind, student.size(0),
          student.size(1)};
}

// A requested (rows, cols) gradient, or the 0 x 0 placeholder of one not requested.
inline at::Tensor gradient_or_empty(bool wanted, int64_t rows, int64_t cols,
                                    const at::TensorOptions& options) {
  return at::empty({wanted ? rows : 0, wanted ? cols : 0}, options);
}

}  // namespace kdfast
