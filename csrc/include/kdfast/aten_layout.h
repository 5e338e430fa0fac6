// Torch-side helper of kdfast/layout.h for the CPU kernels and the CUDA glue (not for .cu
// files, which see no torch headers).
#pragma once

#include <ATen/core/Tensor.h>

#include "kdfast/layout.h"

namespace kdfast {

// The in-place (B, C, HW) layout of 4-d x, or that of its contiguous copy when x has none
// (or, with need_dense, when x is not dense, so an output may share its strides). *storage
// is set to the tensor the layout describes: x itself or the copy.
inline FeatureLayout layout_or_copy(const at::Tensor& x, bool need_dense, at::Tensor* storage) {
  FeatureLayout layout;
  if ((!need_dense || x.is_non_overlapping_and_dense()) &&
      feature_layout(x.sizes().data(), x.strides().data(), &layout)) {
    *storage = x;
    return layout;
  }
  *storage = x.contiguous();
  return contiguous_feature_layout(storage->sizes().data());
}

}  // namespace kdfast
