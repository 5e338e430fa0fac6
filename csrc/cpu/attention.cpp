// Attention map forward on the CPU.
//
// Math (Zagoruyko & Komodakis, attention transfer): for features A of shape (B, C, HW),
//   Q[b, i]   = (1/C) * sum_c |A[b, c, i]|^p
//   q_hat[b]  = Q[b] / max(||Q[b]||_2, eps)
// One pass over A: each task owns a block of HW positions of one sample and streams the C
// channel rows through it (contiguous inner loop over HW, vectorisable), accumulating in
// the op-math type (fp32 for fp16/bf16/fp32, fp64 for fp64). The normalisation is a second,
// B x HW sized pass.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>

#include "kdfast/math.h"

namespace {

constexpr int64_t kHwBlock = 1024;

template <typename scalar_t, typename acc_t, typename Power>
void accumulate_block(const scalar_t* rows, int64_t channels, int64_t hw, int64_t begin,
                      int64_t end, acc_t* out, Power power) {
  std::fill(out + begin, out + end, acc_t(0));
  for (int64_t c = 0; c < channels; ++c) {
    const scalar_t* row = rows + c * hw;
    for (int64_t i = begin; i < end; ++i) out[i] += power(static_cast<acc_t>(row[i]));
  }
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(channels);
  for (int64_t i = begin; i < end; ++i) out[i] *= inv_c;
}

template <typename scalar_t, typename acc_t, typename Power>
void attention_sums(const scalar_t* x, int64_t batch, int64_t channels, int64_t hw, acc_t* q,
                    Power power) {
  const int64_t blocks = (hw + kHwBlock - 1) / kHwBlock;
  at::parallel_for(0, batch * blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t b = task / blocks;
      const int64_t begin = (task % blocks) * kHwBlock;
      const int64_t end = std::min(hw, begin + kHwBlock);
      accumulate_block(x + b * channels * hw, channels, hw, begin, end, q + b * hw, power);
    }
  });
}

template <typename acc_t>
void normalise_rows(acc_t* q, acc_t* norm, int64_t batch, int64_t hw) {
  at::parallel_for(0, batch, 1, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      acc_t* row = q + b * hw;
      acc_t squares = 0;
      for (int64_t i = 0; i < hw; ++i) squares += row[i] * row[i];
      const acc_t n = std::sqrt(squares);
      norm[b] = n;
      const acc_t inv = acc_t(1) / std::max(n, static_cast<acc_t>(kdfast::kNormEps));
      for (int64_t i = 0; i < hw; ++i) row[i] *= inv;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> attention_map_cpu(const at::Tensor& features, double p) {
  TORCH_CHECK(features.dim() == 4, "features must be (B, C, H, W), got ", features.sizes());
  TORCH_CHECK(p >= 1.0, "p must be >= 1, got ", p);
  const at::Tensor x = features.contiguous();
  const int64_t batch = x.size(0), channels = x.size(1), hw = x.size(2) * x.size(3);
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor q = at::empty({batch, hw}, x.options().dtype(acc_type));
  at::Tensor norm = at::empty({batch}, x.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "attention_map", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    acc_t* out = q.mutable_data_ptr<acc_t>();
    if (p == 2.0) {
      attention_sums(in, batch, channels, hw, out, [](acc_t v) { return v * v; });
    } else if (p == 1.0) {
      attention_sums(in, batch, channels, hw, out, [](acc_t v) { return std::abs(v); });
    } else {
      const acc_t exponent = static_cast<acc_t>(p);
      attention_sums(in, batch, channels, hw, out,
                     [exponent](acc_t v) { return kdfast::abs_pow(v, exponent); });
    }
    normalise_rows(out, norm.mutable_data_ptr<acc_t>(), batch, hw);
  });
  return {q, norm};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CPU, m) { m.impl("attention_map", &attention_map_cpu); }
