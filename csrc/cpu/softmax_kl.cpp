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
// needs D or K): those gradients. After sweep 2 a row is summed up by six numbers (RowStats:
// max and log-sum of both softmaxes, D or K_p, K_q), which is all sweep 3 needs.
// Forward KL (KD's case) needs no sweep 2 for its divergence: sweep 1 also sums a cross term
// (forward_kl_row_stats), two exps per entry instead of three; its dL/ds (sweep 2 of the fused
// forward, the backward's one sweep) is one loop from the logits, no block arrays. x/T is a
// multiplication when T is a power of two (exact: the same bits as the division).
// Two operator forms. softmax_kl: the fused forward, the gradients kept in the accumulation
// type (the backward scales them by grad_output and rounds once to the inputs' dtype).
// softmax_kl_with_stats + softmax_kl_backward: the forward runs sweeps 1-2 and keeps only the
// RowStats; the backward runs sweep 3 for every requested gradient with the factor
// T·grad_output[r], rounding once into the returned gradient — forward + backward hold one
// gradient-sized tensor instead of two, for one more read of the inputs.
// Rows run in parallel (at::parallel_for), sums in a fixed order (deterministic), in the
// op-math type (fp32 for fp16/bf16/fp32, fp64 for fp64). fp32 exp is a branch-free
// polynomial so that the block loops vectorise (KDFAST_SIMD_CLONES); fp64 uses std::exp.
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
#include <utility>
#include <vector>

#include "kdfast/aten_dtype.h"
#include "kdfast/aten_softmax_kl.h"
#include "kdfast/simd.h"

namespace {

using kdfast::Divergence;

constexpr int64_t kBlock = 512;        // columns per block (the block buffers stay in L1)
constexpr int kLanes = 16;             // independent partial sums (vectorisable, fixed order)
constexpr int64_t kGrainWork = 8192;  // elements below which rows run on one thread

// exp(x) for float (Cephes' expf): x = k ln2 + r with |r| ≤ ln2/2, exp(r) by a degree-6
// polynomial, 2^k from the exponent bits (≤ 2 ulp over the normal range). Branch-free so
// loops over it vectorise; 0 below the normal range (−inf included), +inf above, NaN for NaN.
KDFAST_ALWAYS_INLINE float exp_of(float x) {
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

KDFAST_ALWAYS_INLINE double exp_of(double x) { return std::exp(x); }

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

// max over a block, NaN ignored (a NaN reaches the sums through exp(NaN − max) instead). GCC
// keeps a lane-array max scalar (a floating-point max reduction needs -ffast-math to
// vectorise); with its vector extension the two 32-byte maxes are explicit and compile to
// whatever each clone's ISA has.
template <typename acc_t>
inline acc_t block_max(const acc_t* v, int64_t n) {
  acc_t peak = kNegInf<acc_t>;
  int64_t i = 0;
#if defined(__GNUC__)
  typedef acc_t Vector __attribute__((vector_size(32)));
  constexpr int kWidth = 32 / sizeof(acc_t);
  Vector lo, hi;
  for (int k = 0; k < kWidth; ++k) lo[k] = hi[k] = kNegInf<acc_t>;
  for (; i + 2 * kWidth <= n; i += 2 * kWidth) {
    Vector x, y;
    std::memcpy(&x, v + i, sizeof x);
    std::memcpy(&y, v + i + kWidth, sizeof y);
    lo = x > lo ? x : lo;
    hi = y > hi ? y : hi;
  }
  for (int k = 0; k < kWidth; ++k) {
    peak = lo[k] > peak ? lo[k] : peak;
    peak = hi[k] > peak ? hi[k] : peak;
  }
#endif
  for (; i < n; ++i) peak = v[i] > peak ? v[i] : peak;
  return peak;
}

// x/T in the accumulation type, as a functor chosen once per call: DivideBy in general,
// MultiplyBy(1/T) when T is a power of two (then x·(1/T) is the same correctly rounded x/T,
// subnormal, infinite and NaN results included, for a fraction of a division's cost).
template <typename acc_t>
struct DivideBy {
  acc_t temperature;
  acc_t operator()(acc_t x) const { return x / temperature; }
};
template <typename acc_t>
struct MultiplyBy {
  acc_t reciprocal;
  acc_t operator()(acc_t x) const { return x * reciprocal; }
};

// body(scale) with the exact cheapest functor computing x/T.
template <typename acc_t, typename Body>
void with_scale(acc_t temperature, const Body& body) {
  int exponent = 0;
  const acc_t reciprocal = acc_t(1) / temperature;
  if (std::frexp(temperature, &exponent) == acc_t(0.5) && std::isnormal(reciprocal)) {
    body(MultiplyBy<acc_t>{reciprocal});
  } else {
    body(DivideBy<acc_t>{temperature});
  }
}

// out = x / T in the accumulation type.
template <typename scalar_t, typename acc_t, typename Scale>
inline void load_scaled(const scalar_t* x, int64_t n, const Scale& scale, acc_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = scale(static_cast<acc_t>(x[i]));
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

// Adds the block x/T of one row to its running logsumexp; v: kBlock of scratch.
template <typename scalar_t, typename acc_t, typename Scale>
KDFAST_SIMD_CLONES void add_block(OnlineLogSumExp<acc_t>& lse, const scalar_t* x, int64_t n,
                                  const Scale& scale, acc_t* v) {
  load_scaled(x, n, scale, v);
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

// Forward KL's teacher-weighted cross term Σ e_t ((b − max b) − (a − max a)) of one block,
// e_t = exp(b − max b) being the teacher's add_block output (v_t), both maxes the running
// ones after the block; an entry b = −inf (a masked class) adds 0. scratch: kBlock.
template <typename scalar_t, typename acc_t, typename Scale>
KDFAST_SIMD_CLONES acc_t cross_block_sum(const scalar_t* s, const scalar_t* t, const acc_t* v_t,
                                         int64_t n, const Scale& scale, acc_t max_s,
                                         acc_t max_t, acc_t* scratch) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t a = scale(static_cast<acc_t>(s[i])), b = scale(static_cast<acc_t>(t[i]));
    scratch[i] = b == kNegInf<acc_t> ? acc_t(0) : v_t[i] * ((b - max_t) - (a - max_s));
  }
  return block_sum(scratch, n);
}

// What a gradient sweep needs of one row: both softmax normalisers (the max of x/T and
// log Σ exp(x/T − max)) and the divergence sums (forward/reverse: D; jsd: K_p and K_q).
// Stored as kRowStats values per row by softmax_kl_with_stats for the backward.
template <typename acc_t>
struct RowStats {
  acc_t max_s, log_sum_s, max_t, log_sum_t, first, second;
};
constexpr int64_t kRowStats = 6;

// One block's log-probabilities and probabilities of both rows (and log m for the JSD).
template <typename acc_t>
struct BlockProbabilities {
  acc_t log_q[kBlock], log_p[kBlock], q[kBlock], p[kBlock], log_m[kBlock];
  int64_t n = 0;
};

// Which probabilities a sweep reads: the log-probabilities always, q and p (an exp per
// entry each) only where needed (forward KL's loss needs p alone, reverse KL's q alone).
struct Needs {
  bool q, p;
};

// log(e^x + e^y), −inf when both are (the JSD's log-space mixture, DKD's full normaliser).
template <typename acc_t>
KDFAST_ALWAYS_INLINE acc_t log_add_exp(acc_t x, acc_t y) {
  const acc_t hi = x > y ? x : y, lo = x > y ? y : x;
  return hi == kNegInf<acc_t> ? hi : hi + std::log1p(exp_of(lo - hi));
}

template <typename scalar_t, typename acc_t, typename Scale>
KDFAST_SIMD_CLONES void fill_block(const scalar_t* s, const scalar_t* t, int64_t n,
                                   const Scale& scale, const RowStats<acc_t>& row, Needs needs,
                                   bool mixture, acc_t beta, BlockProbabilities<acc_t>& block) {
  const acc_t max_s = row.max_s, log_sum_s = row.log_sum_s;
  const acc_t max_t = row.max_t, log_sum_t = row.log_sum_t;
  block.n = n;
  load_scaled(s, n, scale, block.log_q);
  load_scaled(t, n, scale, block.log_p);
  for (int64_t i = 0; i < n; ++i) {
    block.log_q[i] = (block.log_q[i] - max_s) - log_sum_s;
    block.log_p[i] = (block.log_p[i] - max_t) - log_sum_t;
  }
  if (needs.q) {
    for (int64_t i = 0; i < n; ++i) block.q[i] = exp_of(block.log_q[i]);
  }
  if (needs.p) {
    for (int64_t i = 0; i < n; ++i) block.p[i] = exp_of(block.log_p[i]);
  }
  if (mixture) {
    // log m = log(β p + (1−β) q) in log space (p and q may both underflow where log m is
    // finite); −inf where both are masked.
    const acc_t log_beta = std::log(beta), log_rest = std::log1p(-beta);
    for (int64_t i = 0; i < n; ++i) {
      block.log_m[i] = log_add_exp(block.log_p[i] + log_beta, block.log_q[i] + log_rest);
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

// Forward KL's Σ p (log p − log q) over a block straight from the logits, the same sums as
// fill_block + masked_kl_sum without the intermediate arrays. scratch: kBlock.
template <typename scalar_t, typename acc_t, typename Scale>
KDFAST_SIMD_CLONES acc_t forward_kl_block_sum(const scalar_t* s, const scalar_t* t, int64_t n,
                                              const Scale& scale, const RowStats<acc_t>& row,
                                              acc_t* scratch) {
  const acc_t max_s = row.max_s, log_sum_s = row.log_sum_s;
  const acc_t max_t = row.max_t, log_sum_t = row.log_sum_t;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t log_q = (scale(static_cast<acc_t>(s[i])) - max_s) - log_sum_s;
    const acc_t log_p = (scale(static_cast<acc_t>(t[i])) - max_t) - log_sum_t;
    const acc_t p = exp_of(log_p);
    scratch[i] = log_p == kNegInf<acc_t> ? acc_t(0) : p * (log_p - log_q);
  }
  return block_sum(scratch, n);
}

// Forward KL's grad_s = c (q − p) + d q over a block in one loop from the logits (KD: c = G,
// d = 0, the values of fill_block + write_second_argument_grad without the intermediate
// arrays, the same bits; DKD: c = T β, d = −T α Δ).
template <typename scalar_t, typename acc_t, typename Scale, typename out_t>
KDFAST_SIMD_CLONES void write_forward_kl_student_grad(const scalar_t* s, const scalar_t* t,
                                                      int64_t n, const Scale& scale,
                                                      const RowStats<acc_t>& row, acc_t c,
                                                      acc_t d, out_t* grad) {
  const acc_t max_s = row.max_s, log_sum_s = row.log_sum_s;
  const acc_t max_t = row.max_t, log_sum_t = row.log_sum_t;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t q = exp_of((scale(static_cast<acc_t>(s[i])) - max_s) - log_sum_s);
    const acc_t p = exp_of((scale(static_cast<acc_t>(t[i])) - max_t) - log_sum_t);
    grad[i] = static_cast<out_t>(c * (q - p) + d * q);
  }
}

// grad = scale · x (log x − log y − kl), 0 where log x = −inf: the gradient of KL(x‖y) in
// the logits of x = softmax. out_t: the accumulation type (the forward's saved gradient) or
// the inputs' type (the backward's, rounded once from the accumulation type).
template <typename acc_t, typename out_t>
KDFAST_SIMD_CLONES void write_first_argument_grad(const acc_t* x, const acc_t* log_x,
                                                  const acc_t* log_y, acc_t kl, acc_t scale,
                                                  int64_t n, out_t* grad) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t g = log_x[i] == kNegInf<acc_t> ? acc_t(0)
                                               : x[i] * (log_x[i] - log_y[i] - kl);
    grad[i] = static_cast<out_t>(scale * g);
  }
}

// grad = scale · (y − x): the gradient of KL(x‖y) in the logits of y = softmax.
template <typename acc_t, typename out_t>
KDFAST_SIMD_CLONES void write_second_argument_grad(const acc_t* x, const acc_t* y, acc_t scale,
                                                   int64_t n, out_t* grad) {
  for (int64_t i = 0; i < n; ++i) grad[i] = static_cast<out_t>(scale * (y[i] - x[i]));
}

template <typename acc_t>
struct Options {
  Divergence divergence;
  acc_t temperature, beta;
};

// Sweep 1 of one row: both softmax normalisers, in RowStats' first four fields.
template <typename scalar_t, typename acc_t, typename Scale>
RowStats<acc_t> normalisers(const scalar_t* s, const scalar_t* t, int64_t n,
                            const Scale& scale) {
  OnlineLogSumExp<acc_t> student_lse, teacher_lse;
  acc_t scratch[kBlock];
  for (int64_t begin = 0; begin < n; begin += kBlock) {
    const int64_t len = std::min(kBlock, n - begin);
    add_block(student_lse, s + begin, len, scale, scratch);
    add_block(teacher_lse, t + begin, len, scale, scratch);
  }
  return {student_lse.max, student_lse.log_sum(), teacher_lse.max, teacher_lse.log_sum(), 0, 0};
}

// Forward KL's sweep 1 state: both running logsumexps and the cross term
// c = Σ e_t ((b − max b) − (a − max a)), e_t = exp(b − max b), moved along when a running max
// grows (every earlier e_t scales by exp(old max b − max b), every difference shifts by the
// change of max a − max b); then KL = Σ p (log p − log q) = c / Σ e_t − (log Σ_b − log Σ_a)
// (Σ p = 1), the differences to the maxes exact near them as in sweep 2.
template <typename acc_t>
struct ForwardKlSweep {
  OnlineLogSumExp<acc_t> student, teacher;
  acc_t cross = 0;

  RowStats<acc_t> row_stats() const {
    RowStats<acc_t> row{student.max, student.log_sum(), teacher.max, teacher.log_sum(), 0, 0};
    row.first = cross / teacher.sum - (row.log_sum_t - row.log_sum_s);
    return row;
  }
};

// Adds one block of both rows to the sweep, leaving exp(x/T − running max after the block) of
// the student's entries in e_s and of the teacher's in e_t (kBlock each); scratch: kBlock.
template <typename scalar_t, typename acc_t, typename Scale>
void add_forward_kl_block(ForwardKlSweep<acc_t>& sweep, const scalar_t* s, const scalar_t* t,
                          int64_t len, const Scale& scale, acc_t* e_s, acc_t* e_t,
                          acc_t* scratch) {
  const acc_t old_max_s = sweep.student.max, old_max_t = sweep.teacher.max;
  const acc_t old_sum_t = sweep.teacher.sum;
  add_block(sweep.student, s, len, scale, e_s);
  add_block(sweep.teacher, t, len, scale, e_t);
  const acc_t max_s = sweep.student.max, max_t = sweep.teacher.max;
  if (old_sum_t > 0 && (max_s != old_max_s || max_t != old_max_t)) {
    const acc_t shift = (max_s - old_max_s) - (max_t - old_max_t);
    sweep.cross = (sweep.cross + shift * old_sum_t) * exp_of(old_max_t - max_t);
  }
  sweep.cross += cross_block_sum(s, t, e_t, len, scale, max_s, max_t, scratch);
}

// Forward KL's D by sweep 2 (forward_kl_block_sum), for the rows whose one-sweep D is not
// finite (a masked student class under the teacher's mass, NaN, ±inf): special values then
// follow the one rule of the other paths.
template <typename scalar_t, typename acc_t, typename Scale>
void recompute_forward_kl(const scalar_t* s, const scalar_t* t, int64_t n, const Scale& scale,
                          RowStats<acc_t>& row) {
  acc_t scratch[kBlock];
  row.first = 0;
  for (int64_t begin = 0; begin < n; begin += kBlock) {
    const int64_t len = std::min(kBlock, n - begin);
    row.first += forward_kl_block_sum(s + begin, t + begin, len, scale, row, scratch);
  }
}

// Forward KL's RowStats in one sweep (ForwardKlSweep), two exps per entry.
template <typename scalar_t, typename acc_t, typename Scale>
RowStats<acc_t> forward_kl_row_stats(const scalar_t* s, const scalar_t* t, int64_t n,
                                     const Scale& scale) {
  ForwardKlSweep<acc_t> sweep;
  acc_t scratch[kBlock], e_s[kBlock], e_t[kBlock];
  for (int64_t begin = 0; begin < n; begin += kBlock) {
    add_forward_kl_block(sweep, s + begin, t + begin, std::min(kBlock, n - begin), scale, e_s,
                         e_t, scratch);
  }
  RowStats<acc_t> row = sweep.row_stats();
  if (!std::isfinite(row.first)) recompute_forward_kl(s, t, n, scale, row);
  return row;
}

// grad = f_s e_s − f_t e_t over a block: the kept exps times their block's normalising factors.
template <typename acc_t>
KDFAST_SIMD_CLONES void write_kept_exps_grad(const acc_t* e_t, acc_t f_s, acc_t f_t, int64_t n,
                                             acc_t* grad) {
  for (int64_t i = 0; i < n; ++i) grad[i] = f_s * grad[i] - f_t * e_t[i];
}

// Forward KL with a gradient grad_s = c_s q − c_t p in one read of the rows (KD's case: c_s =
// c_t = T; DKD's: its coefficients), the pair (c_s, c_t) = coefficients(row stats): the sweep
// keeps each block's exps (the student's in grad_s itself, the teacher's in e_t, n entries)
// and the running maxes m_s, m_t they were taken against (block_max, one pair per block);
// then q = e_s · exp(m_s − max_s − log Σ_s) and p likewise, one multiply per entry instead of
// two more exps. Rows whose D is not finite take the two-sweep path.
template <typename scalar_t, typename acc_t, typename Scale, typename Coefficients>
RowStats<acc_t> forward_kl_with_student_grad(const scalar_t* s, const scalar_t* t, int64_t n,
                                             const Scale& scale,
                                             const Coefficients& coefficients, acc_t* grad_s,
                                             acc_t* e_t, acc_t* block_max) {
  ForwardKlSweep<acc_t> sweep;
  acc_t scratch[kBlock];
  for (int64_t begin = 0, k = 0; begin < n; begin += kBlock, ++k) {
    add_forward_kl_block(sweep, s + begin, t + begin, std::min(kBlock, n - begin), scale,
                         grad_s + begin, e_t + begin, scratch);
    block_max[2 * k] = sweep.student.max;
    block_max[2 * k + 1] = sweep.teacher.max;
  }
  RowStats<acc_t> row = sweep.row_stats();
  const bool finite = std::isfinite(row.first);
  if (!finite) recompute_forward_kl(s, t, n, scale, row);
  const auto [c_s, c_t] = coefficients(row);
  if (!finite) {
    for (int64_t begin = 0; begin < n; begin += kBlock) {
      write_forward_kl_student_grad(s + begin, t + begin, std::min(kBlock, n - begin), scale,
                                    row, c_t, c_s - c_t, grad_s + begin);
    }
    return row;
  }
  for (int64_t begin = 0, k = 0; begin < n; begin += kBlock, ++k) {
    const acc_t f_s = c_s * exp_of((block_max[2 * k] - row.max_s) - row.log_sum_s);
    const acc_t f_t = c_t * exp_of((block_max[2 * k + 1] - row.max_t) - row.log_sum_t);
    write_kept_exps_grad(e_t + begin, f_s, f_t, std::min(kBlock, n - begin), grad_s + begin);
  }
  return row;
}

// Sweeps 1 and 2 of one row (length n): its RowStats, writing on the way the gradients that
// need no sum (forward dL/ds, reverse dL/dt) times grad_scale where a pointer is given.
template <typename scalar_t, typename acc_t, typename out_t, typename Scale>
RowStats<acc_t> row_stats(const scalar_t* s, const scalar_t* t, int64_t n,
                          const Options<acc_t>& o, const Scale& scale, acc_t grad_scale,
                          out_t* sum_free_grad_s, out_t* sum_free_grad_t) {
  const acc_t G = o.temperature * grad_scale;
  if (o.divergence == Divergence::kForward) {
    const RowStats<acc_t> row = forward_kl_row_stats<scalar_t, acc_t>(s, t, n, scale);
    for (int64_t begin = 0; sum_free_grad_s && begin < n; begin += kBlock) {
      const int64_t len = std::min(kBlock, n - begin);
      write_forward_kl_student_grad(s + begin, t + begin, len, scale, row, G, acc_t(0),
                                    sum_free_grad_s + begin);
    }
    return row;
  }
  RowStats<acc_t> row = normalisers<scalar_t, acc_t>(s, t, n, scale);
  const bool jsd = o.divergence == Divergence::kJsd;
  const Needs needs{true, jsd || sum_free_grad_t != nullptr};
  acc_t scratch[kBlock];
  BlockProbabilities<acc_t> b;
  for (int64_t begin = 0; begin < n; begin += kBlock) {
    const int64_t len = std::min(kBlock, n - begin);
    fill_block(s + begin, t + begin, len, scale, row, needs, jsd, o.beta, b);
    if (jsd) {
      row.first += masked_kl_sum(b.p, b.log_p, b.log_m, len, scratch);
      row.second += masked_kl_sum(b.q, b.log_q, b.log_m, len, scratch);
    } else {
      row.first += masked_kl_sum(b.q, b.log_q, b.log_p, len, scratch);
      if (sum_free_grad_t) write_second_argument_grad(b.q, b.p, G, len, sum_free_grad_t + begin);
    }
  }
  return row;
}

// The gradient sweep: the gradients whose pointer is given, times grad_scale, from the row's
// stats (one more read of both rows).
template <typename scalar_t, typename acc_t, typename out_t, typename Scale>
void write_row_gradients(const scalar_t* s, const scalar_t* t, int64_t n,
                         const Options<acc_t>& o, const Scale& scale, const RowStats<acc_t>& row,
                         acc_t grad_scale, out_t* grad_s, out_t* grad_t) {
  const acc_t T = o.temperature, G = T * grad_scale;
  if (o.divergence == Divergence::kForward && grad_s && !grad_t) {
    for (int64_t begin = 0; begin < n; begin += kBlock) {
      const int64_t len = std::min(kBlock, n - begin);
      write_forward_kl_student_grad(s + begin, t + begin, len, scale, row, G, acc_t(0),
                                    grad_s + begin);
    }
    return;
  }
  const bool jsd = o.divergence == Divergence::kJsd;
  BlockProbabilities<acc_t> b;
  for (int64_t begin = 0; begin < n; begin += kBlock) {
    const int64_t len = std::min(kBlock, n - begin);
    fill_block(s + begin, t + begin, len, scale, row, Needs{true, true}, jsd, o.beta, b);
    if (o.divergence == Divergence::kForward) {
      if (grad_s) write_second_argument_grad(b.p, b.q, G, len, grad_s + begin);
      if (grad_t) write_first_argument_grad(b.p, b.log_p, b.log_q, row.first, G, len,
                                            grad_t + begin);
    } else if (o.divergence == Divergence::kReverse) {
      if (grad_s) write_first_argument_grad(b.q, b.log_q, b.log_p, row.first, G, len,
                                            grad_s + begin);
      if (grad_t) write_second_argument_grad(b.q, b.p, G, len, grad_t + begin);
    } else {
      if (grad_s) {
        write_first_argument_grad(b.q, b.log_q, b.log_m, row.second, G * (acc_t(1) - o.beta),
                                  len, grad_s + begin);
      }
      if (grad_t) {
        write_first_argument_grad(b.p, b.log_p, b.log_m, row.first, G * o.beta, len,
                                  grad_t + begin);
      }
    }
  }
}

// The loss T² D of a row from its stats.
template <typename acc_t>
acc_t row_loss(const RowStats<acc_t>& row, const Options<acc_t>& o) {
  const acc_t divergence = o.divergence == Divergence::kJsd
                               ? o.beta * row.first + (acc_t(1) - o.beta) * row.second
                               : row.first;
  return o.temperature * o.temperature * divergence;
}

// size values of scratch for the calling thread (kept between calls, grown as needed).
template <typename acc_t>
acc_t* row_scratch(int64_t size) {
  thread_local std::vector<acc_t> buffer;
  if (buffer.size() < static_cast<size_t>(size)) buffer.resize(static_cast<size_t>(size));
  return buffer.data();
}

// The scratch of forward_kl_with_student_grad for rows of n: the teacher's exps, then the
// block maxes.
int64_t kept_exps_size(int64_t n) { return n + 2 * ((n + kBlock - 1) / kBlock); }

// The fused forward of one row: its loss, writing the requested gradients (nullptr: not
// requested) in two sweeps, or three when a gradient needs the sums; KD's case (forward KL,
// the student's gradient only) in one read of the rows (forward_kl_with_student_grad).
template <typename scalar_t, typename acc_t, typename Scale>
acc_t softmax_kl_row(const scalar_t* s, const scalar_t* t, int64_t n, const Options<acc_t>& o,
                     const Scale& scale, acc_t* grad_s, acc_t* grad_t) {
  const bool forward = o.divergence == Divergence::kForward;
  if (forward && grad_s && !grad_t) {
    acc_t* scratch = row_scratch<acc_t>(kept_exps_size(n));
    const auto both_temperature = [&](const RowStats<acc_t>&) {
      return std::pair<acc_t, acc_t>{o.temperature, o.temperature};
    };
    return row_loss(forward_kl_with_student_grad(s, t, n, scale, both_temperature, grad_s,
                                                 scratch, scratch + n),
                    o);
  }
  const bool reverse = o.divergence == Divergence::kReverse;
  const RowStats<acc_t> row = row_stats(s, t, n, o, scale, acc_t(1),
                                        forward ? grad_s : nullptr, reverse ? grad_t : nullptr);
  acc_t* rest_s = forward ? nullptr : grad_s;
  acc_t* rest_t = reverse ? nullptr : grad_t;
  if (rest_s || rest_t) write_row_gradients(s, t, n, o, scale, row, acc_t(1), rest_s, rest_t);
  return row_loss(row, o);
}

// DKD (Zhao et al., CVPR 2022; kdfast/reference/dkd.py): per row with gold class g,
//   loss = T² (α TCKD + β NCKD),  NCKD = KL(p̂_t ‖ p̂_s) over the classes ≠ g (p̂: the softmax
//   of the row with z_g = −inf), TCKD = KL(b_t ‖ b_s) of b = (p_g, 1 − p_g) under the full
//   softmax: log p_g = a_g − lse(a), log(1 − p_g) = lse_{≠g}(a) − lse(a), and
//   lse(a) = logaddexp(a_g, lse_{≠g}(a)) from NCKD's own normaliser (no other pass).
// Gradient in a = s/T (∂/∂s = (1/T) ∂/∂a, with T² → T): NCKD gives q̂_j − p̂_j (0 at g); TCKD,
// through p_s,g = softmax(a)_g with ∂p_s,g/∂a_j = p_s,g (δ_gj − p_s,j) and p_s,j = q̂_j (1 − p_s,g):
//   j = g: Δ = p_s,g − p_t,g,   j ≠ g: −Δ q̂_j.
// So dL/ds_j = T ((β − αΔ) q̂_j − β p̂_j) for j ≠ g and T α Δ at g: forward KL's kept-exps sweep
// over the masked row with the coefficients (T (β − αΔ), T β), then the gold entry.
template <typename acc_t>
struct DkdOptions {
  acc_t temperature, alpha, beta;
};

// p (log p − log q) of one entry, 0 where log p = −inf.
template <typename acc_t>
acc_t kl_term(acc_t log_p, acc_t log_q) {
  return log_p == kNegInf<acc_t> ? acc_t(0) : std::exp(log_p) * (log_p - log_q);
}

// (log p_g, log(1 − p_g)) of one row's full softmax, from the gold logit over T and the
// normaliser (max, log-sum) of the other classes.
template <typename acc_t>
std::pair<acc_t, acc_t> log_binary(acc_t gold, acc_t max_others, acc_t log_sum_others) {
  const acc_t others = max_others + log_sum_others;
  const acc_t total = log_add_exp(gold, others);
  return {gold - total, others - total};
}

// One row's DKD loss, writing dL/ds (accumulation type) where grad_s is given. The row is
// copied with its gold entry at −inf (two rows of scratch in cache) and the masked copies run
// forward KL's sweep.
template <typename scalar_t, typename acc_t, typename Scale>
acc_t dkd_row(const scalar_t* s, const scalar_t* t, int64_t n, int64_t gold,
              const DkdOptions<acc_t>& o, const Scale& scale, acc_t* grad_s) {
  acc_t* scratch = row_scratch<acc_t>(2 * n + kept_exps_size(n));
  acc_t *s_others = scratch, *t_others = scratch + n;
  for (int64_t i = 0; i < n; ++i) {
    s_others[i] = static_cast<acc_t>(s[i]);
    t_others[i] = static_cast<acc_t>(t[i]);
  }
  s_others[gold] = t_others[gold] = kNegInf<acc_t>;
  const acc_t a_gold = scale(static_cast<acc_t>(s[gold]));
  const acc_t b_gold = scale(static_cast<acc_t>(t[gold]));
  std::pair<acc_t, acc_t> binary_s, binary_t;  // (log p_g, log(1 − p_g)) of both rows
  // Sets both binaries from a row's stats and returns Δ = p_s,g − p_t,g.
  const auto gold_binaries = [&](const RowStats<acc_t>& row) {
    binary_s = log_binary(a_gold, row.max_s, row.log_sum_s);
    binary_t = log_binary(b_gold, row.max_t, row.log_sum_t);
    return std::exp(binary_s.first) - std::exp(binary_t.first);
  };
  const acc_t T = o.temperature;
  acc_t delta = 0;
  const RowStats<acc_t> row =
      grad_s ? forward_kl_with_student_grad(
                   s_others, t_others, n, scale,
                   [&](const RowStats<acc_t>& r) {
                     delta = gold_binaries(r);
                     return std::pair<acc_t, acc_t>{T * (o.beta - o.alpha * delta), T * o.beta};
                   },
                   grad_s, scratch + 2 * n, scratch + 3 * n)
             : forward_kl_row_stats<acc_t, acc_t>(s_others, t_others, n, scale);
  if (grad_s) {
    grad_s[gold] = T * o.alpha * delta;
  } else {
    gold_binaries(row);
  }
  const acc_t tckd = kl_term(binary_t.first, binary_s.first) +
                     kl_term(binary_t.second, binary_s.second);
  return T * T * (o.alpha * tckd + o.beta * row.first);
}

// body(r, s_row, t_row) for every row r in parallel (rows of L = cols entries).
template <typename scalar_t, typename Body>
void for_each_row(const at::Tensor& s, const at::Tensor& t, const Body& body) {
  const int64_t rows = s.size(0), cols = s.size(1);
  const int64_t s_stride = s.stride(0), t_stride = t.stride(0);
  const scalar_t* s_data = s.const_data_ptr<scalar_t>();
  const scalar_t* t_data = t.const_data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, kGrainWork / cols);
  at::parallel_for(0, rows, grain, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) body(r, s_data + r * s_stride, t_data + r * t_stride);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_kl_cpu(
    const at::Tensor& student, const at::Tensor& teacher, double temperature,
    c10::string_view divergence, double beta, bool grad_student, bool grad_teacher) {
  const kdfast::LogitRows in = kdfast::logit_rows(student, teacher, temperature, divergence, beta);
  const at::Tensor &s = in.student, &t = in.teacher;
  const Divergence kind = in.divergence;
  const int64_t rows = in.rows, cols = in.cols;
  const auto acc_options = s.options().dtype(kdfast::accumulation_type(s));
  at::Tensor loss = at::empty({rows}, acc_options);
  // Gradients in the accumulation type: the backward scales them by grad_output and rounds
  // once to the inputs' dtype, as the reference does.
  at::Tensor gs = kdfast::gradient_or_empty(grad_student, rows, cols, acc_options);
  at::Tensor gt = kdfast::gradient_or_empty(grad_teacher, rows, cols, acc_options);
  if (rows == 0) return {loss, gs, gt};
  if (cols == 0) return {loss.zero_(), gs, gt};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "softmax_kl", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Options<acc_t> options{kind, static_cast<acc_t>(temperature),
                                 static_cast<acc_t>(beta)};
    acc_t* gs_data = grad_student ? gs.mutable_data_ptr<acc_t>() : nullptr;
    acc_t* gt_data = grad_teacher ? gt.mutable_data_ptr<acc_t>() : nullptr;
    acc_t* loss_data = loss.mutable_data_ptr<acc_t>();
    with_scale(options.temperature, [&](const auto& scale) {
      for_each_row<scalar_t>(s, t, [&](int64_t r, const scalar_t* s_row, const scalar_t* t_row) {
        loss_data[r] = softmax_kl_row(s_row, t_row, cols, options, scale,
                                      gs_data ? gs_data + r * cols : nullptr,
                                      gt_data ? gt_data + r * cols : nullptr);
      });
    });
  });
  return {loss, gs, gt};
}

// The forward of the recomputing backward: the per-row loss and RowStats (N, kRowStats),
// two sweeps, no gradient.
std::tuple<at::Tensor, at::Tensor> softmax_kl_with_stats_cpu(
    const at::Tensor& student, const at::Tensor& teacher, double temperature,
    c10::string_view divergence, double beta) {
  const kdfast::LogitRows in = kdfast::logit_rows(student, teacher, temperature, divergence, beta);
  const at::Tensor &s = in.student, &t = in.teacher;
  const Divergence kind = in.divergence;
  const int64_t rows = in.rows, cols = in.cols;
  const auto acc_options = s.options().dtype(kdfast::accumulation_type(s));
  at::Tensor loss = at::zeros({rows}, acc_options);
  at::Tensor stats = at::zeros({rows, kRowStats}, acc_options);
  if (rows == 0 || cols == 0) return {loss, stats};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(),
                                  "softmax_kl_with_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    static_assert(sizeof(RowStats<acc_t>) == kRowStats * sizeof(acc_t));
    const Options<acc_t> options{kind, static_cast<acc_t>(temperature),
                                 static_cast<acc_t>(beta)};
    acc_t* loss_data = loss.mutable_data_ptr<acc_t>();
    auto* stats_data = reinterpret_cast<RowStats<acc_t>*>(stats.mutable_data_ptr<acc_t>());
    with_scale(options.temperature, [&](const auto& scale) {
      for_each_row<scalar_t>(s, t, [&](int64_t r, const scalar_t* s_row, const scalar_t* t_row) {
        const RowStats<acc_t> row = row_stats<scalar_t, acc_t, acc_t>(
            s_row, t_row, cols, options, scale, acc_t(1), nullptr, nullptr);
        stats_data[r] = row;
        loss_data[r] = row_loss(row, options);
      });
    });
  });
  return {loss, stats};
}

// The backward from the inputs and the forward's RowStats: one sweep per row, the gradients
// scaled by grad[r] and written once, in the inputs' dtype, straight into the returned
// tensors (the only row-size memory of forward + backward).
std::tuple<at::Tensor, at::Tensor> softmax_kl_backward_cpu(
    const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
    const at::Tensor& row_stats_tensor, double temperature, c10::string_view divergence,
    double beta, bool grad_student, bool grad_teacher) {
  const kdfast::LogitRows in = kdfast::logit_rows(student, teacher, temperature, divergence, beta);
  const at::Tensor &s = in.student, &t = in.teacher;
  const Divergence kind = in.divergence;
  const int64_t rows = in.rows, cols = in.cols;
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == rows,
              "softmax_kl_backward: grad must be (N,) for (N, L) inputs, got ", grad.sizes());
  const auto acc = kdfast::accumulation_type(student);
  TORCH_CHECK(row_stats_tensor.sizes() == at::IntArrayRef({rows, kRowStats}) &&
                  row_stats_tensor.scalar_type() == acc,
              "softmax_kl_backward: row_stats must be softmax_kl_with_stats' (N, ", kRowStats,
              ") in the accumulation dtype, got ", row_stats_tensor.sizes());
  const at::Tensor grad_scales = grad.to(acc).contiguous(), stats = row_stats_tensor.contiguous();
  at::Tensor gs = kdfast::gradient_or_empty(grad_student, rows, cols, s.options());
  at::Tensor gt = kdfast::gradient_or_empty(grad_teacher, rows, cols, s.options());
  if (rows == 0 || cols == 0) return {gs, gt};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(),
                                  "softmax_kl_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Options<acc_t> options{kind, static_cast<acc_t>(temperature),
                                 static_cast<acc_t>(beta)};
    const acc_t* scale_data = grad_scales.const_data_ptr<acc_t>();
    const auto* stats_data = reinterpret_cast<const RowStats<acc_t>*>(
        stats.const_data_ptr<acc_t>());
    scalar_t* gs_data = grad_student ? gs.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gt_data = grad_teacher ? gt.mutable_data_ptr<scalar_t>() : nullptr;
    with_scale(options.temperature, [&](const auto& scale) {
      for_each_row<scalar_t>(s, t, [&](int64_t r, const scalar_t* s_row, const scalar_t* t_row) {
        write_row_gradients(s_row, t_row, cols, options, scale, stats_data[r], scale_data[r],
                            gs_data ? gs_data + r * cols : nullptr,
                            gt_data ? gt_data + r * cols : nullptr);
      });
    });
  });
  return {gs, gt};
}

// DKD per row (dkd_row): the loss (N,) and, when asked, dL/ds (N, C), both in the
// accumulation dtype (the autograd Function scales the gradient by grad_output).
std::tuple<at::Tensor, at::Tensor> dkd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                           const at::Tensor& targets, double temperature,
                                           double alpha, double beta, bool grad_student) {
  const kdfast::LogitRows in = kdfast::logit_rows(student, teacher, temperature, "forward", 0.5);
  const at::Tensor &s = in.student, &t = in.teacher;
  const int64_t rows = in.rows, cols = in.cols;
  TORCH_CHECK(cols >= 2, "dkd: the logits need at least two classes, got ", cols);
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == rows &&
                  targets.scalar_type() == at::kLong && targets.device() == s.device(),
              "dkd: targets must be (N,) int64 class indices on the logits' device, got ",
              targets.sizes(), " ", targets.scalar_type());
  const at::Tensor labels = targets.contiguous();
  const int64_t* label_data = labels.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(label_data[r] >= 0 && label_data[r] < cols, "dkd: targets must be in [0, ",
                cols - 1, "], got ", label_data[r]);
  }
  const auto acc_options = s.options().dtype(kdfast::accumulation_type(s));
  at::Tensor loss = at::empty({rows}, acc_options);
  at::Tensor gs = kdfast::gradient_or_empty(grad_student, rows, cols, acc_options);
  if (rows == 0) return {loss, gs};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "dkd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const DkdOptions<acc_t> options{static_cast<acc_t>(temperature), static_cast<acc_t>(alpha),
                                    static_cast<acc_t>(beta)};
    acc_t* gs_data = grad_student ? gs.mutable_data_ptr<acc_t>() : nullptr;
    acc_t* loss_data = loss.mutable_data_ptr<acc_t>();
    with_scale(options.temperature, [&](const auto& scale) {
      for_each_row<scalar_t>(s, t, [&](int64_t r, const scalar_t* s_row, const scalar_t* t_row) {
        loss_data[r] = dkd_row(s_row, t_row, cols, label_data[r], options, scale,
                               gs_data ? gs_data + r * cols : nullptr);
      });
    });
  });
  return {loss, gs};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("softmax_kl", &softmax_kl_cpu);
  m.impl("softmax_kl_with_stats", &softmax_kl_with_stats_cpu);
  m.impl("softmax_kl_backward", &softmax_kl_backward_cpu);
  m.impl("dkd", &dkd_cpu);
}
