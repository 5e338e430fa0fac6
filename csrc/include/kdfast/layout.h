// (B, C, H, W) features seen as (B, C, HW) through element strides, read in place by the
// CPU and CUDA kernels. Plain C++ (no torch headers) so nvcc and the host compiler share it.
#pragma once

#include <cstdint>

namespace kdfast {

struct FeatureLayout {
  int64_t batch, channels, hw;
  int64_t stride_b, stride_c, stride_hw;
  // Each channel's HW positions are contiguous (NCHW, channel slices): stream rows over HW.
  bool rows() const { return stride_hw == 1; }
  // Each position's channels are contiguous (channels_last): reduce along C.
  bool channels_inner() const { return stride_c == 1 && stride_hw != 1; }
};

// The layout of a 4-d tensor with these sizes and strides when H and W collapse into one
// stride and one of the two fast layouts above applies; false otherwise (copy it first).
inline bool feature_layout(const int64_t* sizes, const int64_t* strides, FeatureLayout* out) {
  const int64_t h = sizes[2], w = sizes[3];
  int64_t stride_hw;
  if (h * w == 1) stride_hw = 1;
  else if (h == 1) stride_hw = strides[3];
  else if (w == 1) stride_hw = strides[2];
  else if (strides[2] == w * strides[3]) stride_hw = strides[3];
  else return false;
  const int64_t stride_c = sizes[1] == 1 ? 1 : strides[1];
  *out = FeatureLayout{sizes[0], sizes[1], h * w, strides[0], stride_c, stride_hw};
  return out->rows() || out->channels_inner();
}

// The layout of a contiguous (B, C, H, W) tensor.
inline FeatureLayout contiguous_feature_layout(const int64_t* sizes) {
  const int64_t hw = sizes[2] * sizes[3];
  return FeatureLayout{sizes[0], sizes[1], hw, sizes[1] * hw, hw, 1};
}

}  // namespace kdfast
