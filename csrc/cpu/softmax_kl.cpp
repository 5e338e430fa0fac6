// Row-wise softmax divergences on the CPU: the loss of KD / DML / BAN and its gradients in
// two (or three) sweeps per row. The math is docs/design.md, "Row-wise softmax-KL".
//
// Per row of L logits s (student), t (teacher) and the temperature T:
//   a = s/T, b = t/T,  log q = a − lse(a),  log p = b − lse(b)      (q = p_s, p = p_t)
//   (computed as (a − max a) − log Σ exp(a − max a), like log_softmax)
//   forward  D = KL(p‖q) = Σ p (log p − log q)
//   reverse  D = KL(q‖p) = Σ q (log q − log p)
//   jsd(β)   D = β K_p + (1−β) K_q,  K_p = KL(p‖m), K_q = KL(q‖m),  m = β p + (1−β) q
//            (β = 0 and β = 1 are forward and reverse KL, as in Liger-Kernel and TRL)
//   loss = T² D.
// Gradients. For x = softmax(u) the chain rule through the softmax gives, for any y not
// depending on u, ∂KL(x‖y)/∂u_j = x_j (log x_j − log y_j − KL(x‖y)), and for y = softmax(u),
// ∂KL(x‖y)/∂u_j = y_j − x_j. In the JSD, D = β Σ p log p + (1−β) Σ q log q − Σ m log m, so
// ∂D/∂q_j = (1−β)(log q_j − log m_j) (the +1s cancel) and through the softmax
// ∂D/∂a_j = (1−β) q_j (log q_j − log m_j − K_q). With ∂/∂s = (1/T) ∂/∂a and the factor T²:
//   forward  dL/ds = T (q − p),                        dL/dt = T p (log p − log q − D)
//   reverse  dL/ds = T q (log q − log p − D),          dL/dt = T (p − q)
//   jsd      dL/ds = T (1−β) q (log q − log m − K_q),  dL/dt = T β p (log p − log m − K_p)
// A term x (log x − log y) with log x = −inf (x = 0: a masked class) is 0 and so is its
// gradient x (…), never the 0·∞ = NaN of the plain product; NaN and +inf logits give NaN.
//
// Sweeps. 1: both logsumexps at once, online over column blocks (per block its max, the
// running sum rescaled by exp(old max − new max) when the max grows, then Σ exp(x − max)).
// 2: per block the log-probabilities and probabilities, the divergence sums and the gradients
// that need no row sum (forward dL/ds, reverse dL/dt). 3 (only when asked for a gradient that
// needs D or K): those gradients. Nothing of row size is kept but the gradients (in the
// accumulation type, so that the backward rounds once to the inputs' dtype); rows run in
// parallel (at::parallel_for), sums in a fixed order (deterministic), in the op-math type
// (fp32 for fp16/bf16/fp32, fp64 for fp64). fp32 exp is a branch-free polynomial so that the
// block loops vectorise (KDFAST_SIMD_CLONES); fp64 uses std::exp.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>

#include "kdfast/aten_dtype.h"
#include "kdfast/aten_softmax_kl.h"
#include "kdfast/simd.h"

namespace {

using kdfast::Divergence;

constexpr int64_t kBlock = 512;        // columns per block (the block buffers stay in L1)
constexpr int kLanes = 16;             // independent partial sums (vectorisable, fixed order)
constexpr int64_t kGrainWork = 32768;  // elements below which rows run on one thread

// exp(x) for float (Cephes' expf): x = k ln2 + r with |r| ≤ ln2/2, exp(r) by a degree-6
// polynomial, 2^k from the exponent bits (≤ 2 ulp over the normal range). Branch-free so
// loops over it vectorise; 0 below the normal range (−inf included), +inf above, NaN for NaN.
inline float exp_of(float x) {
  constexpr float kLo = -87.33654475f, kHi = 88.0f;
  float c = x > kLo ? x : kLo;  // NaN -> kLo (no NaN inside; the result is selected below)
  c = c < kHi ? c : kHi;
  const float rounded = c * 1.44269504088896341f + 12582912.0f;  // + 1.5·2^23 rounds k
  const float k = rounded - 12582912.0f;
  const float r = (c - k * 0.693359375f) - k * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  float e = y * scale;
  e = x < kLo ? 0.0f : e;
  e = x > kHi ? std::numeric_limits<float>::infinity() : e;
  return x != x ? x : e;
}

inline double exp_of(double x) { return std::exp(x); }

template <typename acc_t>
constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

// Σ v[i] over a block with kLanes partial sums combined in a fixed order.
template <typename acc_t>
inline acc_t block_sum(const acc_t* v, int64_t n) {
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) lanes[k] += v[i + k];
  }
  for (; i < n; ++i) lanes[0] += v[i];
  acc_t total = 0;
  for (int k = 0; k < kLanes; ++k) total += lanes[k];
  return total;
}

// max over a block, NaN ignored (a NaN reaches the sums through exp(NaN − max) instead).
template <typename acc_t>
inline acc_t block_max(const acc_t* v, int64_t n) {
  acc_t lanes[kLanes];
  std::fill(lanes, lanes + kLanes, kNegInf<acc_t>);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) lanes[k] = v[i + k] > lanes[k] ? v[i + k] : lanes[k];
  }
  for (; i < n; ++i) lanes[0] = v[i] > lanes[0] ? v[i] : lanes[0];
  acc_t peak = kNegInf<acc_t>;
  for (int k = 0; k < kLanes; ++k) peak = lanes[k] > peak ? lanes[k] : peak;
  return peak;
}

// out = x / T in the accumulation type.
template <typename scalar_t, typename acc_t>
inline void load_scaled(const scalar_t* x, int64_t n, acc_t temperature, acc_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<acc_t>(x[i]) / temperature;
}

// Running logsumexp of one row, fed block by block (sweep 1).
template <typename acc_t>
struct OnlineLogSumExp {
  acc_t max = kNegInf<acc_t>;
  acc_t sum = 0;

  // log Σ exp(x − max): log p = (x − max) − log_sum, as log_softmax computes it (x − max is
  // exact near the max, so small divergences keep their digits). A row of −inf or one with
  // a NaN or +inf entry gives NaN log-probabilities.
  acc_t log_sum() const { return std::log(sum); }
};

// Adds a block v of one row to its running logsumexp; v is scratch (overwritten).
template <typename acc_t>
KDFAST_SIMD_CLONES void add_block(OnlineLogSumExp<acc_t>& lse, acc_t* v, int64_t n) {
  const acc_t peak = block_max(v, n);
  if (peak > lse.max) {
    lse.sum *= exp_of(lse.max - peak);  // 0 while the running max is −inf (the sum is 0 too)
    lse.max = peak;
  }
  const acc_t m = lse.max;
  // An entry −inf contributes 0 (also while every entry so far is −inf: the NaN of −inf − −inf
  // is selected away). exp is evaluated unconditionally so that the loop has no branch.
  for (int64_t i = 0; i < n; ++i) {
    const acc_t e = exp_of(v[i] - m);
    v[i] = v[i] == kNegInf<acc_t> ? acc_t(0) : e;
  }
  lse.sum += block_sum(v, n);
}

// One block's log-probabilities and probabilities of both rows (and log m for the JSD).
template <typename acc_t>
struct BlockProbabilities {
  acc_t log_q[kBlock], log_p[kBlock], q[kBlock], p[kBlock], log_m[kBlock];
  int64_t n = 0;
};

template <typename scalar_t, typename acc_t>
KDFAST_SIMD_CLONES void fill_block(const scalar_t* s, const scalar_t* t, int64_t n,
                                   acc_t temperature, const OnlineLogSumExp<acc_t>& lse_s,
                                   const OnlineLogSumExp<acc_t>& lse_t, bool mixture,
                                   acc_t beta, BlockProbabilities<acc_t>& block) {
  const acc_t max_s = lse_s.max, log_sum_s = lse_s.log_sum();
  const acc_t max_t = lse_t.max, log_sum_t = lse_t.log_sum();
  block.n = n;
  load_scaled(s, n, temperature, block.log_q);
  load_scaled(t, n, temperature, block.log_p);
  for (int64_t i = 0; i < n; ++i) {
    block.log_q[i] = (block.log_q[i] - max_s) - log_sum_s;
    block.log_p[i] = (block.log_p[i] - max_t) - log_sum_t;
    block.q[i] = exp_of(block.log_q[i]);
    block.p[i] = exp_of(block.log_p[i]);
  }
  if (mixture) {
    // log m = log(β p + (1−β) q) in log space (p and q may both underflow where log m is
    // finite); −inf where both are masked.
    const acc_t log_beta = std::log(beta), log_rest = std::log1p(-beta);
    for (int64_t i = 0; i < n; ++i) {
      const acc_t x = block.log_p[i] + log_beta, y = block.log_q[i] + log_rest;
      const acc_t hi = x > y ? x : y, lo = x > y ? y : x;
      block.log_m[i] = hi == kNegInf<acc_t> ? hi : hi + std::log1p(exp_of(lo - hi));
    }
  }
}

// Σ x (log x − log y) over a block, the terms with log x = −inf being 0. scratch: kBlock.
template <typename acc_t>
KDFAST_SIMD_CLONES acc_t masked_kl_sum(const acc_t* x, const acc_t* log_x, const acc_t* log_y,
                                       int64_t n, acc_t* scratch) {
  for (int64_t i = 0; i < n; ++i) {
    scratch[i] = log_x[i] == kNegInf<acc_t> ? acc_t(0) : x[i] * (log_x[i] - log_y[i]);
  }
  return block_sum(scratch, n);
}

// grad = scale · x (log x − log y − kl), 0 where log x = −inf: the gradient of KL(x‖y) in
// the logits of x = softmax.
template <typename acc_t>
KDFAST_SIMD_CLONES void write_first_argument_grad(const acc_t* x, const acc_t* log_x,
                                                  const acc_t* log_y, acc_t kl, acc_t scale,
                                                  int64_t n, acc_t* grad) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t g = log_x[i] == kNegInf<acc_t> ? acc_t(0)
                                               : x[i] * (log_x[i] - log_y[i] - kl);
    grad[i] = scale * g;
  }
}

// grad = scale · (y − x): the gradient of KL(x‖y) in the logits of y = softmax.
template <typename acc_t>
KDFAST_SIMD_CLONES void write_second_argument_grad(const acc_t* x, const acc_t* y, acc_t scale,
                                                   int64_t n, acc_t* grad) {
  for (int64_t i = 0; i < n; ++i) grad[i] = scale * (y[i] - x[i]);
}

template <typename acc_t>
struct Options {
  Divergence divergence;
  acc_t temperature, beta;
  bool grad_student, grad_teacher;
};

// The loss T² D of one row, writing the requested gradients (rows of length n).
template <typename scalar_t, typename acc_t>
acc_t softmax_kl_row(const scalar_t* s, const scalar_t* t, int64_t n, const Options<acc_t>& o,
                     acc_t* grad_s, acc_t* grad_t) {
  const acc_t T = o.temperature;
  OnlineLogSumExp<acc_t> student_lse, teacher_lse;
  {
    acc_t scratch[kBlock];
    for (int64_t begin = 0; begin < n; begin += kBlock) {
      const int64_t len = std::min(kBlock, n - begin);
      load_scaled(s + begin, len, T, scratch);
      add_block(student_lse, scratch, len);
      load_scaled(t + begin, len, T, scratch);
      add_block(teacher_lse, scratch, len);
    }
  }
  const bool jsd = o.divergence == Divergence::kJsd;
  const bool forward = o.divergence == Divergence::kForward;
  const bool reverse = o.divergence == Divergence::kReverse;

  BlockProbabilities<acc_t> b;
  acc_t scratch[kBlock];
  // forward/reverse: D; jsd: K_p and K_q.
  acc_t first = 0, second = 0;
  for (int64_t begin = 0; begin < n; begin += kBlock) {
    const int64_t len = std::min(kBlock, n - begin);
    fill_block(s + begin, t + begin, len, T, student_lse, teacher_lse, jsd, o.beta, b);
    if (forward) {
      first += masked_kl_sum(b.p, b.log_p, b.log_q, len, scratch);
      if (o.grad_student) write_second_argument_grad(b.p, b.q, T, len, grad_s + begin);
    } else if (reverse) {
      first += masked_kl_sum(b.q, b.log_q, b.log_p, len, scratch);
      if (o.grad_teacher) write_second_argument_grad(b.q, b.p, T, len, grad_t + begin);
    } else {
      first += masked_kl_sum(b.p, b.log_p, b.log_m, len, scratch);
      second += masked_kl_sum(b.q, b.log_q, b.log_m, len, scratch);
    }
  }

  const bool third_sweep = (forward && o.grad_teacher) || (reverse && o.grad_student) ||
                           (jsd && (o.grad_student || o.grad_teacher));
  for (int64_t begin = 0; third_sweep && begin < n; begin += kBlock) {
    const int64_t len = std::min(kBlock, n - begin);
    fill_block(s + begin, t + begin, len, T, student_lse, teacher_lse, jsd, o.beta, b);
    if (forward) {
      write_first_argument_grad(b.p, b.log_p, b.log_q, first, T, len, grad_t + begin);
    } else if (reverse) {
      write_first_argument_grad(b.q, b.log_q, b.log_p, first, T, len, grad_s + begin);
    } else {
      if (o.grad_student) {
        write_first_argument_grad(b.q, b.log_q, b.log_m, second, T * (acc_t(1) - o.beta), len,
                                  grad_s + begin);
      }
      if (o.grad_teacher) {
        write_first_argument_grad(b.p, b.log_p, b.log_m, first, T * o.beta, len,
                                  grad_t + begin);
      }
    }
  }
  const acc_t divergence = jsd ? o.beta * first + (acc_t(1) - o.beta) * second : first;
  return T * T * divergence;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_kl_cpu(
    const at::Tensor& student, const at::Tensor& teacher, double temperature,
    c10::string_view divergence, double beta, bool grad_student, bool grad_teacher) {
  kdfast::check_softmax_kl_args(student, teacher, temperature);
  const Divergence kind = kdfast::parse_divergence(divergence, beta);
  const at::Tensor s = kdfast::unit_column_stride(student);
  const at::Tensor t = kdfast::unit_column_stride(teacher);
  const int64_t rows = s.size(0), cols = s.size(1);
  const auto acc = kdfast::accumulation_type(s);
  at::Tensor loss = at::empty({rows}, s.options().dtype(acc));
  // Gradients in the accumulation type: the backward scales them by grad_output and rounds
  // once to the inputs' dtype, as the reference does.
  const auto grad_options = s.options().dtype(acc);
  at::Tensor gs = at::empty({grad_student ? rows : 0, grad_student ? cols : 0}, grad_options);
  at::Tensor gt = at::empty({grad_teacher ? rows : 0, grad_teacher ? cols : 0}, grad_options);
  if (rows == 0) return {loss, gs, gt};
  if (cols == 0) return {loss.zero_(), gs, gt};
  const int64_t s_stride = s.stride(0), t_stride = t.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "softmax_kl", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Options<acc_t> options{kind, static_cast<acc_t>(temperature),
                                 static_cast<acc_t>(beta), grad_student, grad_teacher};
    const scalar_t* s_data = s.const_data_ptr<scalar_t>();
    const scalar_t* t_data = t.const_data_ptr<scalar_t>();
    acc_t* gs_data = grad_student ? gs.mutable_data_ptr<acc_t>() : nullptr;
    acc_t* gt_data = grad_teacher ? gt.mutable_data_ptr<acc_t>() : nullptr;
    acc_t* loss_data = loss.mutable_data_ptr<acc_t>();
    const int64_t grain = std::max<int64_t>(1, kGrainWork / cols);
    at::parallel_for(0, rows, grain, [&](int64_t first, int64_t last) {
      for (int64_t r = first; r < last; ++r) {
        loss_data[r] = softmax_kl_row(s_data + r * s_stride, t_data + r * t_stride, cols,
                                      options, gs_data ? gs_data + r * cols : nullptr,
                                      gt_data ? gt_data + r * cols : nullptr);
      }
    });
  });
  return {loss, gs, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("softmax_kl", &softmax_kl_cpu);
}
