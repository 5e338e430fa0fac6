// Launchers of the CUDA attention-map kernels (csrc/cuda/attention.cu). Plain C++ with raw
// pointers and no torch headers, so nvcc compiles the kernels with the toolkit alone; the
// torch-facing glue (checks, allocation, streams, registration) is attention_glue.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"
#include "kdfast/layout.h"

namespace kdfast {
namespace cuda {

// q_hat (B x HW, contiguous, accumulation type) and norm (B) of mean_C |x|^p.
void attention_map_forward(DType dtype, const void* features, const FeatureLayout& layout,
                           double p, void* q_hat, void* norm, cudaStream_t stream);

// dx (same strides as x) from grad_map, q_hat and norm (B x HW / B, accumulation type,
// contiguous); grad_q is a B x HW accumulation-type workspace.
void attention_map_backward(DType dtype, const void* grad_map, const void* features,
                            const FeatureLayout& layout, const void* q_hat, const void* norm,
                            double p, void* grad_q, void* grad_features, cudaStream_t stream);

}  // namespace cuda
}  // namespace kdfast
