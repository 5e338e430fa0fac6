// Torch-side helpers shared by the channel-MMD CPU kernels (csrc/cpu/mmd_*.cpp) and CUDA glue
// (csrc/cuda/mmd_glue.cpp): the kernel names, the (B, C, HW) view and the argument checks of
// the three operators channel_mmd_gram, channel_mmd_feature_gram and channel_mmd_linear
// (csrc/kdfast.cpp). Not for .cu files, which see no torch headers.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>
#include <utility>

#include "kdfast/math.h"

namespace kdfast {

// The kMmd* kind of a kernel name.
inline int mmd_kernel_kind(c10::string_view name) {
  if (name == "linear") return kMmdLinear;
  if (name == "poly") return kMmdPoly;
  TORCH_CHECK(name == "rbf", "kernel must be 'linear', 'poly' or 'rbf', got '", std::string(name),
              "'");
  return kMmdRbf;
}

// (B, C, H, W) -> (B, C, HW): a view when one of the last two strides is 1 (contiguous and
// channels_last inputs: the layouts BLAS and cuBLAS take), else a contiguous copy.
inline at::Tensor channel_rows(const at::Tensor& features) {
  TORCH_CHECK(features.dim() == 4, "features must be (B, C, H, W), got ", features.sizes());
  at::Tensor rows = features.flatten(2);
  if (rows.stride(2) == 1 || rows.stride(1) == 1) return rows;
  return rows.contiguous();
}

// The checks every channel-MMD operator makes: one floating dtype, 4-d features of one B, H
// and W, and two channels in each set an unbiased mean averages. Returns the (B, C, HW) rows
// of student and teacher (channel_rows).
inline std::pair<at::Tensor, at::Tensor> checked_channel_rows(const at::Tensor& student,
                                                              const at::Tensor& teacher,
                                                              bool unbiased, bool teacher_term) {
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(),
              "student and teacher must have one dtype, got ", student.scalar_type(), " and ",
              teacher.scalar_type());
  TORCH_CHECK(at::isFloatingType(student.scalar_type()), "features must be floating point");
  at::Tensor xs = channel_rows(student), ys = channel_rows(teacher);
  TORCH_CHECK(xs.size(0) == ys.size(0) && xs.size(2) == ys.size(2),
              "student and teacher must share B, H and W, got ", student.sizes(), " and ",
              teacher.sizes());
  TORCH_CHECK(!unbiased || (xs.size(1) >= 2 && (!teacher_term || ys.size(1) >= 2)),
              "unbiased=True needs at least 2 channels in each set it averages");
  return {xs, ys};
}

// The further checks of channel_mmd_gram: the poly degree and the rbf bandwidths.
inline void check_gram_kernel_options(int64_t degree, at::ArrayRef<double> sigma2,
                                      bool sigma_mean) {
  TORCH_CHECK(degree >= 1, "degree must be >= 1, got ", degree);
  TORCH_CHECK(sigma_mean || !sigma2.empty(), "sigma2 must hold at least one bandwidth");
  TORCH_CHECK(static_cast<int64_t>(sigma2.size()) <= kMmdMaxBandwidths, "at most ",
              kMmdMaxBandwidths, " bandwidths, got ", sigma2.size());
  for (double s : sigma2) TORCH_CHECK(s > 0, "every sigma2 must be > 0, got ", s);
}

}  // namespace kdfast
