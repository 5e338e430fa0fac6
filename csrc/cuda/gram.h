// Launchers of the CUDA batch-Gram epilogues (csrc/cuda/gram.cu): everything around the
// cuBLAS GEMMs of SP. Raw pointers, no torch headers; glue in gram_glue.cpp. All
// arrays are contiguous in the accumulation type (float, or double when is_double).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace kdfast {
namespace cuda {

// SP forward: n x n grams a_s, a_t -> row-normalised g_s, g_t, row norms, per-row loss.
void similarity_forward(bool is_double, const void* a_s, const void* a_t, int64_t n, void* g_s,
                        void* g_t, void* norm_s, void* norm_t, void* loss, cudaStream_t stream);

// SP backward for one side (sign -1 student, +1 teacher): w = dA + dA^T, using da (n x n)
// as workspace.
void similarity_backward(bool is_double, const void* grad, const void* g_s, const void* g_t,
                         const void* norm, double sign, int64_t n, void* da, void* w,
                         cudaStream_t stream);

}  // namespace cuda
}  // namespace kdfast
