// Attention map forward and backward on the CPU.
//
// Math (Zagoruyko & Komodakis, attention transfer): for features A of shape (B, C, HW),
//   Q[b, i]   = (1/C) * sum_c |A[b, c, i]|^p
//   q_hat[b]  = Q[b] / max(||Q[b]||_2, eps)   (||Q|| finite for every finite Q)
// Backward (docs/design.md), with n = max(||Q[b]||, eps):
//   dQ[b]     = (dq_hat - <dq_hat, q_hat> q_hat) / n   (dq_hat / eps where ||Q|| <= eps)
//   dA[b,c,i] = (p/C) |A|^(p-1) sign(A) dQ[b, i]
// Both passes read A in place through its strides (no contiguous copy) when H and W
// collapse to one stride: "rows" layouts (HW stride 1, e.g. NCHW or a channel slice) stream
// the C rows through a block of HW positions; "channels-inner" layouts (C stride 1, e.g.
// channels_last) reduce each position's contiguous channels. Other layouts are copied once.
// Accumulation in the op-math type (fp32 for fp16/bf16/fp32, fp64 for fp64). Every task
// owns its output block, and sums run in a fixed order, so results are deterministic.
//
// The AT loss itself (attention_loss): per sample, from both maps,
//   code:  L = (1/HW) sum_i (q_s - q_t)_i^2,  dq_s = (2/HW) g (q_s - q_t)
//   paper: L = ||q_s - q_t||_2,               dq_s = g (q_s - q_t) / L   (0 where L = 0)
// and dq_t = -dq_s: one operator call forward and one backward instead of the two maps and
// about ten small ATen calls of the B x HW epilogue (which cost as much as the passes over
// the features at CIFAR sizes on a small CPU).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kdfast/aten_dtype.h"
#include "kdfast/aten_layout.h"
#include "kdfast/math.h"
#include "kdfast/simd.h"

namespace {

constexpr int64_t kHwBlock = 1024;   // positions per task in the rows layout
constexpr int64_t kPosBlock = 64;    // positions per task in the channels-inner layout
constexpr int kLanes = 8;            // independent partial sums (vectorisable, fixed order)
constexpr int64_t kGrainWork = 32768;  // elements below which a loop runs on one thread
// The same for the B x HW loops around the passes over the features (normalising the maps,
// the loss, dQ): a few flops an element, cheaper than a parallel region's start and barrier
// up to about 2^20 elements (on a loaded 2-core machine each region waited for a descheduled
// thread: 8 ms a region, 9 regions a step at 64x64x32x32 before).
constexpr int64_t kGrainMapWork = 1 << 20;

// parallel_for grain (tasks) so that one thread gets at least min_work elements.
int64_t grain_for(int64_t work_per_task, int64_t min_work = kGrainWork) {
  return std::max<int64_t>(1, min_work / std::max<int64_t>(1, work_per_task));
}

using kdfast::FeatureLayout;
using kdfast::layout_or_copy;

// Runs fn(b, begin, end) over every (sample, block of positions) task in parallel.
template <typename Fn>
void for_each_block(int64_t batch, int64_t channels, int64_t hw, int64_t block, const Fn& fn) {
  const int64_t blocks = (hw + block - 1) / block;
  const int64_t grain = grain_for(channels * std::min(block, hw));
  at::parallel_for(0, batch * blocks, grain, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t b = task / blocks;
      const int64_t begin = (task % blocks) * block;
      fn(b, begin, std::min(hw, begin + block));
    }
  });
}

// sum_c power(row[c]) over a contiguous row, kLanes partial sums combined in a fixed order.
template <typename scalar_t, typename acc_t, typename Power>
acc_t reduce_contiguous(const scalar_t* row, int64_t n, Power power) {
  acc_t lanes[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    for (int k = 0; k < kLanes; ++k) lanes[k] += power(static_cast<acc_t>(row[c + k]));
  }
  for (; c < n; ++c) lanes[0] += power(static_cast<acc_t>(row[c]));
  acc_t total = 0;
  for (int k = 0; k < kLanes; ++k) total += lanes[k];
  return total;
}

// out[i] = sum_c power(x[c * stride_c + i]) for i in [0, n), the channel sums in a fixed order.
// Rows longer than kShortRow bytes: four channel rows per pass over out (a quarter of the
// loads and stores of out). Shorter rows (HW <= 256 in fp32, the small CIFAR stages): one row
// at a time, in memory order, with a software prefetch of the row kPrefetchAhead bytes ahead:
// four interleaved short rows are four streams of a few cache lines each, too short for the
// hardware prefetcher (docs/regression_sweep.md, part 3).
constexpr int64_t kShortRow = 1024;
constexpr int64_t kPrefetchAhead = 2048;

template <typename scalar_t, typename acc_t, typename Power>
KDFAST_SIMD_CLONES void sum_channel_rows(const scalar_t* x, int64_t stride_c, int64_t channels,
                                         int64_t n, acc_t* out, Power power) {
  std::fill(out, out + n, acc_t(0));
  const int64_t row_bytes = n * static_cast<int64_t>(sizeof(scalar_t));
  int64_t c = 0;
  if (row_bytes <= kShortRow) {
    const int64_t ahead = (kPrefetchAhead + row_bytes - 1) / row_bytes;  // in rows
    for (; c < channels; ++c) {
      const scalar_t* row = x + c * stride_c;
      // A prefetch past the tensor's end is harmless (a hint, never a fault).
      const char* next = reinterpret_cast<const char*>(row + ahead * stride_c);
      for (int64_t k = 0; k < row_bytes; k += 64) __builtin_prefetch(next + k);
      for (int64_t i = 0; i < n; ++i) out[i] += power(static_cast<acc_t>(row[i]));
    }
    return;
  }
  for (; c + 4 <= channels; c += 4) {
    const scalar_t* r0 = x + c * stride_c;
    const scalar_t* r1 = r0 + stride_c;
    const scalar_t* r2 = r1 + stride_c;
    const scalar_t* r3 = r2 + stride_c;
    for (int64_t i = 0; i < n; ++i) {
      out[i] += (power(static_cast<acc_t>(r0[i])) + power(static_cast<acc_t>(r1[i]))) +
                (power(static_cast<acc_t>(r2[i])) + power(static_cast<acc_t>(r3[i])));
    }
  }
  for (; c < channels; ++c) {
    const scalar_t* row = x + c * stride_c;
    for (int64_t i = 0; i < n; ++i) out[i] += power(static_cast<acc_t>(row[i]));
  }
}

// One side of the forward: features x with layout l, and its map Q (B x HW).
template <typename scalar_t, typename acc_t>
struct MapSide {
  const scalar_t* x;
  FeatureLayout l;
  acc_t* q;
  int64_t block() const { return l.rows() ? kHwBlock : kPosBlock; }
  int64_t blocks() const { return (l.hw + block() - 1) / block(); }
  int64_t tasks() const { return l.batch * blocks(); }
};

// Q[b, begin:end] = (1/C) sum_c power(A[b, c, begin:end]) of one side.
template <typename scalar_t, typename acc_t, typename Power>
void map_block(const MapSide<scalar_t, acc_t>& side, int64_t b, int64_t begin, int64_t end,
               Power power) {
  const FeatureLayout& l = side.l;
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(l.channels);
  acc_t* out = side.q + b * l.hw + begin;
  if (l.rows()) {
    sum_channel_rows(side.x + b * l.stride_b + begin, l.stride_c, l.channels, end - begin, out,
                     power);
    for (int64_t i = 0; i < end - begin; ++i) out[i] *= inv_c;
  } else {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* row = side.x + b * l.stride_b + i * l.stride_hw;
      out[i - begin] = reduce_contiguous<scalar_t, acc_t>(row, l.channels, power) * inv_c;
    }
  }
}

// Q of every side, all sides' (sample, block of positions) tasks in one parallel region, the
// sides in the order given. The region is split by work (C x positions a task), not by task
// count, so a teacher wider than the student does not land on one thread: each chunk
// [first, last) of work runs the tasks that start in it.
template <typename scalar_t, typename acc_t, typename Power>
void attention_sums(const MapSide<scalar_t, acc_t>* sides, int count, Power power) {
  std::vector<int64_t> task_work(count), start(count + 1, 0);
  for (int k = 0; k < count; ++k) {
    const int64_t positions = std::min(sides[k].block(), sides[k].l.hw);
    task_work[k] = std::max<int64_t>(1, sides[k].l.channels * positions);
    start[k + 1] = start[k] + sides[k].tasks() * task_work[k];
  }
  at::parallel_for(0, start[count], kGrainWork, [&](int64_t first, int64_t last) {
    for (int k = 0; k < count; ++k) {
      const MapSide<scalar_t, acc_t>& side = sides[k];
      const auto task_at = [&](int64_t work) {  // the first task starting at or after work
        const int64_t offset = std::max<int64_t>(0, work - start[k]);
        return std::min(side.tasks(), (offset + task_work[k] - 1) / task_work[k]);
      };
      const int64_t blocks = side.blocks(), block = side.block();
      for (int64_t task = task_at(first); task < task_at(last); ++task) {
        const int64_t begin = (task % blocks) * block;
        map_block(side, task / blocks, begin, std::min(side.l.hw, begin + block), power);
      }
    }
  });
}

template <typename acc_t>
void normalise_rows(acc_t* q, acc_t* norm, int64_t batch, int64_t hw) {
  at::parallel_for(0, batch, grain_for(hw, kGrainMapWork), [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      acc_t* row = q + b * hw;
      // ||Q|| stays finite where sum Q^2 overflows (norm_from_sum_sq); a NaN stays NaN.
      const acc_t n = kdfast::norm_from_sum_sq(
          reduce_contiguous<acc_t, acc_t>(row, hw, [](acc_t v) { return v * v; }), row, hw, 1);
      norm[b] = n;
      const acc_t inv = acc_t(1) / std::max(n, static_cast<acc_t>(kdfast::kNormEps));
      for (int64_t i = 0; i < hw; ++i) row[i] *= inv;
    }
  });
}

// dQ scaled by p/C (B x HW, accumulation type) from dq_hat, q_hat and the norms.
template <typename acc_t>
void map_grad(const acc_t* grad_map, const acc_t* q_hat, const acc_t* norm, int64_t batch,
              int64_t hw, acc_t scale, acc_t* grad_q) {
  const acc_t eps = static_cast<acc_t>(kdfast::kNormEps);
  at::parallel_for(0, batch, grain_for(hw, kGrainMapWork), [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const acc_t* g = grad_map + b * hw;
      const acc_t* q = q_hat + b * hw;
      acc_t* out = grad_q + b * hw;
      if (norm[b] > eps) {
        acc_t lanes[kLanes] = {};
        int64_t i = 0;
        for (; i + kLanes <= hw; i += kLanes) {
          for (int k = 0; k < kLanes; ++k) lanes[k] += g[i + k] * q[i + k];
        }
        for (; i < hw; ++i) lanes[0] += g[i] * q[i];
        acc_t along = 0;
        for (int k = 0; k < kLanes; ++k) along += lanes[k];
        const acc_t s = scale / norm[b];
        for (i = 0; i < hw; ++i) out[i] = (g[i] - along * q[i]) * s;
      } else {
        const acc_t s = scale / eps;
        for (int64_t i = 0; i < hw; ++i) out[i] = g[i] * s;
      }
    }
  });
}

// out[c * stride_c + i] = local(x[c * stride_c + i]) * dq[i] for every channel c and i in
// [0, n): one call of the SIMD clone (an indirect call) per block, not per channel row.
template <typename scalar_t, typename acc_t, typename Local>
KDFAST_SIMD_CLONES void scale_rows(const scalar_t* x, int64_t stride_c, int64_t channels,
                                   const acc_t* dq, int64_t n, scalar_t* out, Local local) {
  for (int64_t c = 0; c < channels; ++c) {
    const scalar_t* row = x + c * stride_c;
    scalar_t* out_row = out + c * stride_c;
    for (int64_t i = 0; i < n; ++i) {
      out_row[i] = static_cast<scalar_t>(local(static_cast<acc_t>(row[i])) * dq[i]);
    }
  }
}

// dA = local(A) * dQ over the layout; dA has the same strides as A.
template <typename scalar_t, typename acc_t, typename Local>
void input_grad(const scalar_t* x, scalar_t* dx, const FeatureLayout& l, const acc_t* grad_q,
                Local local) {
  if (l.rows()) {
    for_each_block(l.batch, l.channels, l.hw, kHwBlock, [&](int64_t b, int64_t begin, int64_t end) {
      const acc_t* dq = grad_q + b * l.hw;
      const int64_t offset = b * l.stride_b + begin;
      scale_rows(x + offset, l.stride_c, l.channels, dq + begin, end - begin, dx + offset, local);
    });
  } else {
    for_each_block(l.batch, l.channels, l.hw, kPosBlock, [&](int64_t b, int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t offset = b * l.stride_b + i * l.stride_hw;
        const scalar_t* row = x + offset;
        scalar_t* out = dx + offset;
        const acc_t d = grad_q[b * l.hw + i];
        for (int64_t c = 0; c < l.channels; ++c) {
          out[c] = static_cast<scalar_t>(local(static_cast<acc_t>(row[c])) * d);
        }
      }
    });
  }
}

// Calls fn(power) with |v|^p specialised for p = 2 and p = 1 (vectorisable), else generic.
template <typename acc_t, typename Fn>
void with_power(double p, const Fn& fn) {
  if (p == 2.0) fn([](acc_t v) { return v * v; });
  else if (p == 1.0) fn([](acc_t v) { return std::abs(v); });
  else fn([e = static_cast<acc_t>(p)](acc_t v) { return kdfast::abs_pow(v, e); });
}

// Calls fn(local) with d|v|^p/dv specialised like with_power.
template <typename acc_t, typename Fn>
void with_power_grad(double p, const Fn& fn) {
  if (p == 2.0) fn([](acc_t v) { return acc_t(2) * v; });
  else if (p == 1.0) fn([](acc_t v) { return acc_t((v > 0) - (v < 0)); });
  else fn([e = static_cast<acc_t>(p)](acc_t v) { return kdfast::abs_pow_grad(v, e); });
}

void check_features(const at::Tensor& features, double p) {
  TORCH_CHECK(features.dim() == 4, "features must be (B, C, H, W), got ", features.sizes());
  TORCH_CHECK(p >= 1.0, "p must be >= 1, got ", p);
}

// (q_hat, ||Q||) of each of the features (one dtype): the sums of all of them in one parallel
// region, in the order given.
std::vector<std::tuple<at::Tensor, at::Tensor>> attention_maps(
    const std::vector<at::Tensor>& features, double p) {
  const int count = static_cast<int>(features.size());
  std::vector<at::Tensor> xs(count);
  std::vector<FeatureLayout> layouts(count);
  std::vector<std::tuple<at::Tensor, at::Tensor>> maps;
  for (int k = 0; k < count; ++k) {
    check_features(features[k], p);
    layouts[k] = layout_or_copy(features[k], /*need_dense=*/false, &xs[k]);
    const auto options = xs[k].options().dtype(kdfast::accumulation_type(xs[k]));
    maps.emplace_back(at::empty({layouts[k].batch, layouts[k].hw}, options),
                      at::empty({layouts[k].batch}, options));
  }
  const auto dtype = xs[0].scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "attention_map", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<MapSide<scalar_t, acc_t>> sides;
    for (int k = 0; k < count; ++k) {
      acc_t* q = std::get<0>(maps[k]).template mutable_data_ptr<acc_t>();
      if (xs[k].numel() == 0) {  // no channels (or nothing at all): Q = 0
        std::get<0>(maps[k]).zero_();
        continue;
      }
      sides.push_back({xs[k].template const_data_ptr<scalar_t>(), layouts[k], q});
    }
    if (!sides.empty()) {
      with_power<acc_t>(p, [&](auto power) {
        attention_sums(sides.data(), static_cast<int>(sides.size()), power);
      });
    }
    for (int k = 0; k < count; ++k) {
      normalise_rows(std::get<0>(maps[k]).template mutable_data_ptr<acc_t>(),
                     std::get<1>(maps[k]).template mutable_data_ptr<acc_t>(), layouts[k].batch,
                     layouts[k].hw);
    }
  });
  return maps;
}

std::tuple<at::Tensor, at::Tensor> attention_map_cpu(const at::Tensor& features, double p) {
  return attention_maps({features}, p)[0];
}

at::Tensor attention_map_backward_cpu(const at::Tensor& grad_map, const at::Tensor& features,
                                      const at::Tensor& q_hat, const at::Tensor& norm,
                                      double p) {
  check_features(features, p);
  // dA is written with A's strides, so A must be dense for dA to be a valid tensor of them.
  at::Tensor x;
  const FeatureLayout l = layout_or_copy(features, /*need_dense=*/true, &x);
  at::Tensor grad = at::empty_like(x, at::MemoryFormat::Preserve);
  TORCH_CHECK(grad.strides() == x.strides(), "attention_map_backward: stride mismatch");
  if (x.numel() == 0) return grad;
  const auto acc = kdfast::accumulation_type(x);
  const at::Tensor g = grad_map.to(acc).contiguous().view({l.batch, l.hw});
  const at::Tensor qh = q_hat.to(acc).contiguous();
  const at::Tensor n = norm.to(acc).contiguous();
  at::Tensor grad_q = at::empty({l.batch, l.hw}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "attention_map_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    map_grad(g.const_data_ptr<acc_t>(), qh.const_data_ptr<acc_t>(), n.const_data_ptr<acc_t>(),
             l.batch, l.hw, static_cast<acc_t>(1.0 / static_cast<double>(l.channels)),
             grad_q.mutable_data_ptr<acc_t>());
    with_power_grad<acc_t>(p, [&](auto local) {
      input_grad(x.const_data_ptr<scalar_t>(), grad.mutable_data_ptr<scalar_t>(), l,
                 grad_q.const_data_ptr<acc_t>(), local);
    });
  });
  return grad;
}

// The per-sample AT loss of two (B, HW) maps and the weight w (B,) with dq_s = w (q_s - q_t)
// for an upstream gradient of 1 (see the top of the file).
template <typename acc_t>
void map_loss(const acc_t* q_s, const acc_t* q_t, int64_t batch, int64_t hw, bool paper,
              acc_t* loss, acc_t* weight) {
  at::parallel_for(0, batch, grain_for(hw, kGrainMapWork), [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const acc_t* s = q_s + b * hw;
      const acc_t* t = q_t + b * hw;
      acc_t lanes[kLanes] = {};
      int64_t i = 0;
      for (; i + kLanes <= hw; i += kLanes) {
        for (int k = 0; k < kLanes; ++k) {
          const acc_t d = s[i + k] - t[i + k];
          lanes[k] += d * d;
        }
      }
      for (; i < hw; ++i) lanes[0] += (s[i] - t[i]) * (s[i] - t[i]);
      acc_t sum_sq = 0;
      for (int k = 0; k < kLanes; ++k) sum_sq += lanes[k];
      if (paper) {
        loss[b] = std::sqrt(sum_sq);
        weight[b] = loss[b] > acc_t(0) ? acc_t(1) / loss[b] : acc_t(0);
      } else {
        loss[b] = sum_sq / static_cast<acc_t>(hw);
        weight[b] = acc_t(2) / static_cast<acc_t>(hw);
      }
    }
  });
}

void check_pair(const at::Tensor& student, const at::Tensor& teacher, double p) {
  check_features(student, p);
  check_features(teacher, p);
  TORCH_CHECK(student.size(0) == teacher.size(0) && student.size(2) == teacher.size(2) &&
                  student.size(3) == teacher.size(3),
              "attention_loss: student ", student.sizes(), " and teacher ", teacher.sizes(),
              " need the same B, H and W");
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(),
              "attention_loss: student and teacher need one dtype");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_loss_cpu(
    const at::Tensor& student, const at::Tensor& teacher, double p, bool paper) {
  check_pair(student, teacher, p);
  // The teacher first: the student, read last, is the likelier to be in the cache for the
  // backward.
  auto maps = attention_maps({teacher, student}, p);
  auto [q_t, norm_t] = maps[0];
  auto [q_s, norm_s] = maps[1];
  const int64_t batch = q_s.size(0), hw = q_s.size(1);
  at::Tensor loss = at::empty({batch}, q_s.options());
  at::Tensor weight = at::empty({batch}, q_s.options());
  AT_DISPATCH_FLOATING_TYPES(q_s.scalar_type(), "attention_loss", [&] {
    map_loss(q_s.const_data_ptr<scalar_t>(), q_t.const_data_ptr<scalar_t>(), batch, hw, paper,
             loss.mutable_data_ptr<scalar_t>(), weight.mutable_data_ptr<scalar_t>());
  });
  return {loss, q_s, norm_s, q_t, norm_t};
}

// dq_s = grad * w (q_s - q_t) (B x HW, accumulation type), then each wanted side's dA.
std::tuple<at::Tensor, at::Tensor> attention_loss_backward_cpu(
    const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
    const at::Tensor& q_s, const at::Tensor& norm_s, const at::Tensor& q_t,
    const at::Tensor& norm_t, double p, bool paper, bool grad_student, bool grad_teacher) {
  check_pair(student, teacher, p);
  const at::Tensor qs = q_s.contiguous(), qt = q_t.contiguous();
  const int64_t batch = qs.size(0), hw = qs.size(1);
  at::Tensor grad_map = at::empty_like(qs);
  AT_DISPATCH_FLOATING_TYPES(qs.scalar_type(), "attention_loss_backward", [&] {
    std::vector<scalar_t> loss(batch), weight(batch);
    const scalar_t* s = qs.const_data_ptr<scalar_t>();
    const scalar_t* t = qt.const_data_ptr<scalar_t>();
    map_loss(s, t, batch, hw, paper, loss.data(), weight.data());
    const at::Tensor g = grad.to(qs.scalar_type()).contiguous();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* out = grad_map.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, batch, grain_for(hw, kGrainMapWork), [&](int64_t first, int64_t last) {
      for (int64_t b = first; b < last; ++b) {
        const scalar_t w = gp[b] * weight[b];
        for (int64_t i = b * hw; i < (b + 1) * hw; ++i) out[i] = w * (s[i] - t[i]);
      }
    });
  });
  at::Tensor d_student = grad_student
      ? attention_map_backward_cpu(grad_map, student, qs, norm_s, p)
      : at::empty({0}, student.options());
  at::Tensor d_teacher = grad_teacher
      ? attention_map_backward_cpu(grad_map.neg(), teacher, qt, norm_t, p)
      : at::empty({0}, teacher.options());
  return {d_student, d_teacher};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("attention_map", &attention_map_cpu);
  m.impl("attention_map_backward", &attention_map_backward_cpu);
  m.impl("attention_loss", &attention_loss_cpu);
  m.impl("attention_loss_backward", &attention_loss_backward_cpu);
}
