// The launchers' element type of an ATen tensor, for the torch-facing CUDA glue files.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "dtype.h"

namespace kdfast {
namespace cuda {

inline DType kernel_dtype(const at::Tensor& x, const char* op) {
  switch (x.scalar_type()) {
    case at::kFloat: return DType::kF32;
    case at::kDouble: return DType::kF64;
    case at::kHalf: return DType::kF16;
    case at::kBFloat16: return DType::kBF16;
    default: TORCH_CHECK(false, "kdfast ", op, ": unsupported dtype ", x.scalar_type());
  }
}

}  // namespace cuda
}  // namespace kdfast
