// CUDA row-wise softmax divergence: loss and gradients of KD / DML / BAN / CWD per row. The
// math (log-probabilities, the three divergences, their gradients, masked entries, the
// RowStats layout) is derived atop csrc/cpu/softmax_kl.cpp and in docs/design.md, "Row-wise
// softmax-KL".
//
// One block of kBlockThreads threads per row, the row's columns strided by the block (so
// coalesced). Sweep 1: each thread keeps an online (max, Σ exp(x − max)) of both rows over its
// columns, combined by a fixed-order block reduction into the two logsumexps. Sweep 2: the
// divergence sums (block-reduced); after it a row is summed up by its RowStats (max and
// log-sum of both softmaxes, D or K_p, K_q). Gradient sweep: from the RowStats, each requested
// gradient times G = T · grad_scale.
// Three kernels on these pieces: softmax_kl_kernel (the fused forward of kdfast::softmax_kl:
// sweeps 1-2, the gradients that need no sum written in sweep 2, a gradient sweep only for
// the others; gradients in the accumulation type), softmax_kl_stats_kernel (sweeps 1-2, the
// loss and the RowStats only) and softmax_kl_backward_kernel (the gradient sweep from the
// RowStats with grad_scale = grad[r], rounded once into the inputs' type). Accumulation in
// float (double for double), int64 offsets, no atomics: deterministic.
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

// Everything but the tensors.
template <typename Acc>
struct Options {
  Acc temperature, beta, log_beta, log_rest;
  Divergence divergence;
};

// What a gradient sweep needs of one row, kRowStats values in this order (the CPU's layout).
template <typename Acc>
struct RowStats {
  Acc max_s, log_sum_s, max_t, log_sum_t, first, second;
};

template <typename Acc>
struct Entry {
  Acc log_q, log_p, q, p, log_m;
};

template <typename T, typename Acc>
__device__ __forceinline__ Entry<Acc> entry(const T* s, const T* t, int64_t j,
                                            const Options<Acc>& o, const RowStats<Acc>& row) {
  Entry<Acc> e;
  e.log_q = (to_acc<Acc>(s[j]) / o.temperature - row.max_s) - row.log_sum_s;
  e.log_p = (to_acc<Acc>(t[j]) / o.temperature - row.max_t) - row.log_sum_t;
  e.q = exp(e.log_q);
  e.p = exp(e.log_p);
  e.log_m = e.log_p;
  if (o.divergence == Divergence::kJsd) {
    // log m = log(β p + (1−β) q) in log space; −inf where both are masked.
    const Acc x = e.log_p + o.log_beta, y = e.log_q + o.log_rest;
    const Acc hi = x > y ? x : y, lo = x > y ? y : x;
    e.log_m = hi == neg_inf<Acc>() ? hi : hi + log1p(exp(lo - hi));
  }
  return e;
}

// Sweeps 1 and 2 of one row: its RowStats, writing on the way the gradients that need no sum
// (forward dL/ds, reverse dL/dt) times G where a pointer is given. Every thread calls it.
template <typename T, typename Acc, typename Out>
__device__ RowStats<Acc> row_stats(const T* s, const T* t, int64_t cols, const Options<Acc>& o,
                                   Acc G, Out* sum_free_gs, Out* sum_free_gt) {
  Acc max_s = neg_inf<Acc>(), sum_s = 0, max_t = neg_inf<Acc>(), sum_t = 0;
  for (int64_t j = threadIdx.x; j < cols; j += kBlockThreads) {
    fold(to_acc<Acc>(s[j]) / o.temperature, max_s, sum_s);
    fold(to_acc<Acc>(t[j]) / o.temperature, max_t, sum_t);
  }
  RowStats<Acc> row;
  row_log_sum(max_s, sum_s, &row.max_s, &row.log_sum_s);
  row_log_sum(max_t, sum_t, &row.max_t, &row.log_sum_t);
  Acc first = 0, second = 0;  // forward/reverse: D; jsd: K_p, K_q
  for (int64_t j = threadIdx.x; j < cols; j += kBlockThreads) {
    const Entry<Acc> e = entry(s, t, j, o, row);
    if (o.divergence == Divergence::kForward) {
      first += masked_kl_term(e.p, e.log_p, e.log_q);
      if (sum_free_gs) sum_free_gs[j] = Store<Out>::from(G * (e.q - e.p));
    } else if (o.divergence == Divergence::kReverse) {
      first += masked_kl_term(e.q, e.log_q, e.log_p);
      if (sum_free_gt) sum_free_gt[j] = Store<Out>::from(G * (e.p - e.q));
    } else {
      first += masked_kl_term(e.p, e.log_p, e.log_m);
      second += masked_kl_term(e.q, e.log_q, e.log_m);
    }
  }
  row.first = block_sum(first);
  row.second = block_sum(second);
  return row;
}

// The gradient sweep: the gradients whose pointer is given, times G, from the row's stats.
template <typename T, typename Acc, typename Out>
__device__ void write_row_gradients(const T* s, const T* t, int64_t cols, const Options<Acc>& o,
                                    const RowStats<Acc>& row, Acc G, Out* gs, Out* gt) {
  for (int64_t j = threadIdx.x; j < cols; j += kBlockThreads) {
    const Entry<Acc> e = entry(s, t, j, o, row);
    if (o.divergence == Divergence::kForward) {
      if (gs) gs[j] = Store<Out>::from(G * (e.q - e.p));
      if (gt) gt[j] = Store<Out>::from(G * first_argument_grad(e.p, e.log_p, e.log_q, row.first));
    } else if (o.divergence == Divergence::kReverse) {
      if (gs) gs[j] = Store<Out>::from(G * first_argument_grad(e.q, e.log_q, e.log_p, row.first));
      if (gt) gt[j] = Store<Out>::from(G * (e.p - e.q));
    } else {
      if (gs) {
        gs[j] = Store<Out>::from(G * (Acc(1) - o.beta) *
                                 first_argument_grad(e.q, e.log_q, e.log_m, row.second));
      }
      if (gt) {
        gt[j] = Store<Out>::from(G * o.beta *
                                 first_argument_grad(e.p, e.log_p, e.log_m, row.first));
      }
    }
  }
}

template <typename Acc>
__device__ __forceinline__ Acc row_loss(const RowStats<Acc>& row, const Options<Acc>& o) {
  const Acc d = o.divergence == Divergence::kJsd
                    ? o.beta * row.first + (Acc(1) - o.beta) * row.second
                    : row.first;
  return o.temperature * o.temperature * d;
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kBlockThreads)
softmax_kl_kernel(const T* student, const T* teacher, int64_t cols, int64_t s_stride,
                  int64_t t_stride, Options<Acc> o, Acc* loss, Acc* grad_s, Acc* grad_t) {
  const int64_t row = blockIdx.x;
  const T* s = student + row * s_stride;
  const T* t = teacher + row * t_stride;
  Acc* gs = grad_s ? grad_s + row * cols : nullptr;
  Acc* gt = grad_t ? grad_t + row * cols : nullptr;
  const bool forward = o.divergence == Divergence::kForward;
  const bool reverse = o.divergence == Divergence::kReverse;
  const RowStats<Acc> stats = row_stats(s, t, cols, o, o.temperature, forward ? gs : nullptr,
                                        reverse ? gt : nullptr);
  Acc* rest_s = forward ? nullptr : gs;
  Acc* rest_t = reverse ? nullptr : gt;
  if (rest_s || rest_t) write_row_gradients(s, t, cols, o, stats, o.temperature, rest_s, rest_t);
  if (threadIdx.x == 0) loss[row] = row_loss(stats, o);
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kBlockThreads)
softmax_kl_stats_kernel(const T* student, const T* teacher, int64_t cols, int64_t s_stride,
                        int64_t t_stride, Options<Acc> o, Acc* loss, RowStats<Acc>* stats) {
  const int64_t row = blockIdx.x;
  const RowStats<Acc> r = row_stats<T, Acc, Acc>(student + row * s_stride,
                                                 teacher + row * t_stride, cols, o, Acc(0),
                                                 nullptr, nullptr);
  if (threadIdx.x == 0) {
    stats[row] = r;
    loss[row] = row_loss(r, o);
  }
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kBlockThreads)
softmax_kl_backward_kernel(const Acc* grad, const T* student, const T* teacher,
                           const RowStats<Acc>* stats, int64_t cols, int64_t s_stride,
                           int64_t t_stride, Options<Acc> o, T* grad_s, T* grad_t) {
  const int64_t row = blockIdx.x;
  write_row_gradients(student + row * s_stride, teacher + row * t_stride, cols, o, stats[row],
                      o.temperature * grad[row], grad_s ? grad_s + row * cols : nullptr,
                      grad_t ? grad_t + row * cols : nullptr);
}

template <typename Acc>
Options<Acc> options(double temperature, Divergence divergence, double beta) {
  const bool jsd = divergence == Divergence::kJsd;
  return Options<Acc>{static_cast<Acc>(temperature), static_cast<Acc>(beta),
                      jsd ? static_cast<Acc>(std::log(beta)) : Acc(0),
                      jsd ? static_cast<Acc>(std::log1p(-beta)) : Acc(0), divergence};
}

unsigned grid(int64_t rows) { return static_cast<unsigned>(rows); }

// body(T{}, Acc{}) with the element and accumulation types of dtype.
template <typename Body>
void dispatch(DType dtype, const Body& body) {
  switch (dtype) {
    case DType::kF32:
      return body(float{}, float{});
    case DType::kF64:
      return body(double{}, double{});
    case DType::kF16:
      return body(__half{}, float{});
    case DType::kBF16:
      return body(__nv_bfloat16{}, float{});
  }
}

}  // namespace

void softmax_kl_forward(DType dtype, const void* student, const void* teacher, int64_t rows,
                        int64_t cols, int64_t student_stride, int64_t teacher_stride,
                        double temperature, Divergence divergence, double beta,
                        void* loss, void* grad_student, void* grad_teacher,
                        cudaStream_t stream) {
  dispatch(dtype, [&](auto element, auto accumulator) {
    using T = decltype(element);
    using Acc = decltype(accumulator);
    softmax_kl_kernel<T, Acc><<<grid(rows), kBlockThreads, 0, stream>>>(
        static_cast<const T*>(student), static_cast<const T*>(teacher), cols, student_stride,
        teacher_stride, options<Acc>(temperature, divergence, beta), static_cast<Acc*>(loss),
        static_cast<Acc*>(grad_student), static_cast<Acc*>(grad_teacher));
  });
}

void softmax_kl_with_stats(DType dtype, const void* student, const void* teacher, int64_t rows,
                           int64_t cols, int64_t student_stride, int64_t teacher_stride,
                           double temperature, Divergence divergence, double beta, void* loss,
                           void* row_stats, cudaStream_t stream) {
  dispatch(dtype, [&](auto element, auto accumulator) {
    using T = decltype(element);
    using Acc = decltype(accumulator);
    static_assert(sizeof(RowStats<Acc>) == kRowStats * sizeof(Acc), "RowStats layout");
    softmax_kl_stats_kernel<T, Acc><<<grid(rows), kBlockThreads, 0, stream>>>(
        static_cast<const T*>(student), static_cast<const T*>(teacher), cols, student_stride,
        teacher_stride, options<Acc>(temperature, divergence, beta), static_cast<Acc*>(loss),
        static_cast<RowStats<Acc>*>(row_stats));
  });
}

void softmax_kl_backward(DType dtype, const void* grad, const void* student, const void* teacher,
                         const void* row_stats, int64_t rows, int64_t cols,
                         int64_t student_stride, int64_t teacher_stride, double temperature,
                         Divergence divergence, double beta, void* grad_student,
                         void* grad_teacher, cudaStream_t stream) {
  dispatch(dtype, [&](auto element, auto accumulator) {
    using T = decltype(element);
    using Acc = decltype(accumulator);
    softmax_kl_backward_kernel<T, Acc><<<grid(rows), kBlockThreads, 0, stream>>>(
        static_cast<const Acc*>(grad), static_cast<const T*>(student),
        static_cast<const T*>(teacher), static_cast<const RowStats<Acc>*>(row_stats), cols,
        student_stride, teacher_stride, options<Acc>(temperature, divergence, beta),
        static_cast<T*>(grad_student), static_cast<T*>(grad_teacher));
  });
}

}  // namespace cuda
}  // namespace kdfast
