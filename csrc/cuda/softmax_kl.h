// Launcher of the CUDA row-wise softmax-divergence kernel (csrc/cuda/softmax_kl.cu). Plain C++
// with raw pointers and no torch headers, so nvcc compiles the kernel with the toolkit alone;
// the torch-facing glue (checks, allocation, stream, registration) is softmax_kl_glue.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"
#include "kdfast/divergence.h"

namespace kdfast {
namespace cuda {

// Per row r < rows of student / teacher logits (row r at r * stride, columns contiguous):
// loss[r] = T² D and, where the pointer is not null, dL/ds and dL/dt (rows x cols,
// contiguous). loss and the gradients are in the accumulation type.
void softmax_kl_forward(DType dtype, const void* student, const void* teacher, int64_t rows,
                        int64_t cols, int64_t student_stride, int64_t teacher_stride,
                        double temperature, Divergence divergence, double beta,
                        void* loss, void* grad_student, void* grad_teacher,
                        cudaStream_t stream);

}  // namespace cuda
}  // namespace kdfast
