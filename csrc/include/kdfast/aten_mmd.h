// Torch-side helpers shared by the channel-MMD CPU kernels (csrc/cpu/mmd.cpp) and CUDA glue
// (csrc/cuda/mmd_glue.cpp); not for .cu files, which see no torch headers.
#pragma once

#include <ATen/ATen.h>

#include <string>

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

}  // namespace kdfast
