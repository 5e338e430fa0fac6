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

// Values per row of row_stats (accumulation type): the max and log Σ exp(x − max) of the
// student's and of the teacher's x/T, then the divergence sums (forward/reverse: D, 0; jsd:
// K_p, K_q), as on the CPU (csrc/cpu/softmax_kl.cpp).
constexpr int64_t kRowStats = 6;

// Per row r < rows of student / teacher logits (row r at r * stride, columns contiguous):
// loss[r] = T² D and, where the pointer is not null, dL/ds and dL/dt (rows x cols,
// contiguous). loss and the gradients are in the accumulation type.
void softmax_kl_forward(DType dtype, const void* student, const void* teacher, int64_t rows,
                        int64_t cols, int64_t student_stride, int64_t teacher_stride,
                        double temperature, Divergence divergence, double beta,
                        void* loss, void* grad_student, void* grad_teacher,
                        cudaStream_t stream);

// The recomputing forward: loss[r] = T² D and row_stats (rows x kRowStats, contiguous), both
// in the accumulation type; nothing of row size.
void softmax_kl_with_stats(DType dtype, const void* student, const void* teacher, int64_t rows,
                           int64_t cols, int64_t student_stride, int64_t teacher_stride,
                           double temperature, Divergence divergence, double beta, void* loss,
                           void* row_stats, cudaStream_t stream);

// The recomputing backward: from the inputs and softmax_kl_with_stats' row_stats, grad[r]
// (accumulation type) times dL/ds and dL/dt where the pointer is not null (rows x cols,
// contiguous, in the inputs' type, rounded once).
void softmax_kl_backward(DType dtype, const void* grad, const void* student, const void* teacher,
                         const void* row_stats, int64_t rows, int64_t cols,
                         int64_t student_stride, int64_t teacher_stride, double temperature,
                         Divergence divergence, double beta, void* grad_student,
                         void* grad_teacher, cudaStream_t stream);

}  // namespace cuda
}  // namespace kdfast
