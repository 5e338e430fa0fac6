// The accumulation-dtype rule of every kernel (docs/design.md, "Rules every backend follows"):
// float64 features accumulate in float64, every other floating dtype (float32, float16,
// bfloat16) in float32. The CPU kernels and the CUDA glue share this one spelling; the
// Python side is kdfast._precision.accumulation_dtype. Torch-side only (not for .cu files).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

namespace kdfast {

inline c10::ScalarType accumulation_type(c10::ScalarType type) {
  return type == c10::kDouble ? c10::kDouble : c10::kFloat;
}

inline c10::ScalarType accumulation_type(const at::Tensor& x) {
  return accumulation_type(x.scalar_type());
}

}  // namespace kdfast
