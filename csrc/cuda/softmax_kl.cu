// CUDA row-wise softmax divergence: loss and gradients of KD / DML / BAN per row. The math
// (log-probabilities, the three divergences, their gradients, masked entries) is derived
// atop csrc/cpu/softmax_kl.cpp and in docs/design.md, "Row-wise softmax-KL".
//
// One block of kBlockThreads threads per row, three sweeps over the row's columns (strided by
// the block, so coalesced): 1. each thread keeps an online (max, Σ exp(x − max)) of both rows
// over its columns, combined by a fixed-order block reduction into the two logsumexps;
// 2. the divergence sums (block-reduced) and the gradients that need no row sum; 3. only when
// asked for a gradient that needs the row's divergence, those. Accumulation in float (double
// for double), int64 offsets, no atomics: deterministic.
#include <cmath>

#include "block_reduce.cuh"
#include "element.cuh"
#include "softmax_kl.h"

namespace kdfast {
namespace cuda {
namespace {

template <typename Acc>
__device__ __forceinline__ Acc neg_inf() { return -INFINITY; }

// Folds x into a thread's running (max, sum of exp(· − max)); −inf adds 0, NaN makes the sum
// NaN, +inf makes it NaN too (exp(inf − inf)).
template <typename Acc>
__device__ __forceinline__ void fold(Acc x, Acc& max, Acc& sum) {
  if (x == neg_inf<Acc>()) return;
  if (x > max) {
    sum = sum * exp(max - x) + Acc(1);
    max = x;
  } else {
    sum += exp(x - max);
  }
}

// (max, log Σ exp(x − max)) of one row from every thread's running pair.
template <typename Acc>
__device__ void row_log_sum(Acc max, Acc sum, Acc* row_max, Acc* log_sum) {
  const Acc peak = block_reduce(max, Larger());
  const Acc rescaled = max == peak ? sum : sum * exp(max - peak);  // no −inf − −inf
  *row_max = peak;
  *log_sum = log(block_sum(rescaled));
}

template <typename Acc>
__device__ __forceinline__ Acc masked_kl_term(Acc x, Acc log_x, Acc log_y) {
  return log_x == neg_inf<Acc>() ? Acc(0) : x * (log_x - log_y);
}

template <typename Acc>
__device__ __forceinline__ Acc first_argument_grad(Acc x, Acc log_x, Acc log_y, Acc kl) {
  return log_x == neg_inf<Acc>() ? Acc(0) : x * (log_x - log_y - kl);
}

template <typename Acc>
struct Entry {
  Acc log_q, log_p, q, p, log_m;
};

template <typename T, typename Acc>
__device__ __forceinline__ Entry<Acc> entry(const T* s, const T* t, int64_t j, Acc temperature,
                                            Acc max_s, Acc log_sum_s, Acc max_t, Acc log_sum_t,
                                            bool mixture, Acc log_beta, Acc log_rest) {
  Entry<Acc> e;
  e.log_q = (to_acc<Acc>(s[j]) / temperature - max_s) - log_sum_s;
  e.log_p = (to_acc<Acc>(t[j]) / temperature - max_t) - log_sum_t;
  e.q = exp(e.log_q);
  e.p = exp(e.log_p);
  e.log_m = e.log_p;
  if (mixture) {  // log(β p + (1−β) q) in log space; −inf where both are masked
    const Acc x = e.log_p + log_beta, y = e.log_q + log_rest;
    const Acc hi = x > y ? x : y, lo = x > y ? y : x;
    e.log_m = hi == neg_inf<Acc>() ? hi : hi + log1p(exp(lo - hi));
  }
  return e;
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kBlockThreads)
softmax_kl_kernel(const T* student, const T* teacher, int64_t cols, int64_t s_stride,
                  int64_t t_stride, Acc temperature, Divergence divergence, Acc beta,
                  Acc log_beta, Acc log_rest, Acc* loss, Acc* grad_s, Acc* grad_t) {
  const int64_t row = blockIdx.x;
  const T* s = student + row * s_stride;
  const T* t = teacher + row * t_stride;
  Acc* gs = grad_s ? grad_s + row * cols : nullptr;
  Acc* gt = grad_t ? grad_t + row * cols : nullptr;

  Acc max_s = neg_inf<Acc>(), sum_s = 0, max_t = neg_inf<Acc>(), sum_t = 0;
  for (int64_t j = threadIdx.x; j < cols; j += kBlockThreads) {
    fold(to_acc<Acc>(s[j]) / temperature, max_s, sum_s);
    fold(to_acc<Acc>(t[j]) / temperature, max_t, sum_t);
  }
  Acc row_max_s, log_sum_s, row_max_t, log_sum_t;
  row_log_sum(max_s, sum_s, &row_max_s, &log_sum_s);
  row_log_sum(max_t, sum_t, &row_max_t, &log_sum_t);

  const bool forward = divergence == Divergence::kForward;
  const bool reverse = divergence == Divergence::kReverse;
  const bool jsd = divergence == Divergence::kJsd;
  Acc first = 0, second = 0;  // forward/reverse: D; jsd: K_p, K_q
  for (int64_t j = threadIdx.x; j < cols; j += kBlockThreads) {
    const Entry<Acc> e = entry(s, t, j, temperature, row_max_s, log_sum_s, row_max_t, log_sum_t,
                               jsd, log_beta, log_rest);
    if (forward) {
      first += masked_kl_term(e.p, e.log_p, e.log_q);
      if (gs) gs[j] = temperature * (e.q - e.p);
    } else if (reverse) {
      first += masked_kl_term(e.q, e.log_q, e.log_p);
      if (gt) gt[j] = temperature * (e.p - e.q);
    } else {
      first += masked_kl_term(e.p, e.log_p, e.log_m);
      second += masked_kl_term(e.q, e.log_q, e.log_m);
    }
  }
  first = block_sum(first);
  second = block_sum(second);

  const bool third_sweep = (forward && gt) || (reverse && gs) || (jsd && (gs || gt));
  for (int64_t j = threadIdx.x; third_sweep && j < cols; j += kBlockThreads) {
    const Entry<Acc> e = entry(s, t, j, temperature, row_max_s, log_sum_s, row_max_t, log_sum_t,
                               jsd, log_beta, log_rest);
    if (forward) {
      gt[j] = temperature * first_argument_grad(e.p, e.log_p, e.log_q, first);
    } else if (reverse) {
      gs[j] = temperature * first_argument_grad(e.q, e.log_q, e.log_p, first);
    } else {
      if (gs) gs[j] = temperature * (Acc(1) - beta) * first_argument_grad(e.q, e.log_q, e.log_m,
                                                                        second);
      if (gt) gt[j] = temperature * beta * first_argument_grad(e.p, e.log_p, e.log_m, first);
    }
  }
  if (threadIdx.x == 0) {
    const Acc d = jsd ? beta * first + (Acc(1) - beta) * second : first;
    loss[row] = temperature * temperature * d;
  }
}

template <typename T, typename Acc>
void launch(const void* student, const void* teacher, int64_t rows, int64_t cols,
            int64_t s_stride, int64_t t_stride, double temperature, Divergence divergence,
            double beta, void* loss, void* grad_s, void* grad_t, cudaStream_t stream) {
  const bool jsd = divergence == Divergence::kJsd;
  const Acc log_beta = jsd ? static_cast<Acc>(std::log(beta)) : Acc(0);
  const Acc log_rest = jsd ? static_cast<Acc>(std::log1p(-beta)) : Acc(0);
  softmax_kl_kernel<T, Acc><<<static_cast<unsigned>(rows), kBlockThreads, 0, stream>>>(
      static_cast<const T*>(student), static_cast<const T*>(teacher), cols, s_stride, t_stride,
      static_cast<Acc>(temperature), divergence, static_cast<Acc>(beta), log_beta, log_rest,
      static_cast<Acc*>(loss), static_cast<Acc*>(grad_s), static_cast<Acc*>(grad_t));
}

}  // namespace

void softmax_kl_forward(DType dtype, const void* student, const void* teacher, int64_t rows,
                        int64_t cols, int64_t student_stride, int64_t teacher_stride,
                        double temperature, Divergence divergence, double beta,
                        void* loss, void* grad_student, void* grad_teacher,
                        cudaStream_t stream) {
  switch (dtype) {
    case DType::kF32:
      return launch<float, float>(student, teacher, rows, cols, student_stride, teacher_stride,
                                  temperature, divergence, beta, loss, grad_student,
                                  grad_teacher, stream);
    case DType::kF64:
      return launch<double, double>(student, teacher, rows, cols, student_stride,
                                    teacher_stride, temperature, divergence, beta, loss,
                                    grad_student, grad_teacher, stream);
    case DType::kF16:
      return launch<__half, float>(student, teacher, rows, cols, student_stride, teacher_stride,
                                   temperature, divergence, beta, loss, grad_student,
                                   grad_teacher, stream);
    case DType::kBF16:
      return launch<__nv_bfloat16, float>(student, teacher, rows, cols, student_stride,
                                          teacher_stride, temperature, divergence, beta, loss,
                                          grad_student, grad_teacher, stream);
  }
}

}  // namespace cuda
}  // namespace kdfast
