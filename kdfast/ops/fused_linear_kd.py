"""The ``"fused_linear_kd"`` core: the student's lm_head fused with the KD loss, chunked over
tokens so that the (N, V) logits never exist at once (the formula is
:mod:`kdfast.reference.fused_linear_kd`; the math of each option in docs/llm_distillation.md).

One pass over chunks of the kept tokens computes the loss and the gradients w.r.t. the
student's hidden states, weight and bias; per chunk:

1. the logits GEMM(s) in the accumulation dtype (fp32; fp64 for fp64), then ``logit_scale``
   and ``softcap``;
2. the rows the divergence compares: the logits (the shorter vocabulary padded with −inf),
   or for a top-k teacher the student's logits at the k ids / its bucketed log-probabilities;
3. the divergence and its gradient w.r.t. those rows: forward KL, reverse KL and the JSD in
   one fused pass of the ``"softmax_kl"`` core's kernel (native C++/CUDA or Triton), the
   skew KLs and total variation (which that kernel does not have) and any divergence without
   such a kernel (``KDFAST_BACKEND=reference``, an unbuilt extension) by a torch formula on the
   chunk (:func:`torch_divergence`: log-softmaxes and an explicit gradient);
4. the gradient carried back to the chunk's logits (top-k gather / bucket, cap and scale),
   the hard cross-entropy's added, then dL/dhidden = g W and dL/dW += gᵀ h, dL/db += Σ g.

The pass is one ``torch.library`` custom operator (``kdfast_llm::fused_linear_kd``) with a
fake and an autograd formula, so ``torch.compile(fullgraph=True)`` traces it as one opaque
call although it picks the kept tokens with ``nonzero`` (a data-dependent shape) inside.
Backends: ``reference`` (the eager formula) and ``native`` (this operator, built from torch
GEMMs and the ``"softmax_kl"`` core, so it runs on any device).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kdfast import backends
from kdfast._precision import accumulation_dtype, autocast_off
from kdfast.ops._higher_order import creates_graph, reference_grads
from kdfast.ops.softmax_kl import CORE as SOFTMAX_KL
from kdfast.ops.softmax_kl import triton_softmax_kl_backward_op, triton_softmax_kl_with_stats_op
from kdfast.reference.fused_linear_kd import (
    bucket_rows,
    capped,
    fused_linear_kd,
    kept_tokens,
    padded,
)
from kdfast.reference.softmax_kl import DIVERGENCES as CORE_DIVERGENCES
from kdfast.reference.softmax_kl import NEG_INF, kl_terms, log_mixture, row_kl

CORE = "fused_linear_kd"

# One chunk keeps about this many (rows, V) tensors in the accumulation dtype alive: the
# student logits, the teacher logits, dL/dlogits and the cross-entropy softmax. The torch
# formula of a divergence keeps about 6 more (log-softmaxes, mixture, terms), the bucket
# and the cap 2 more each (CPU allocator peaks of fwd+bwd: 3 with the kernel's divergences
# at 1024 x 512 x 32000, the temporaries updated in place; before that, at 256 x 64 x 32000,
# 8 with TV, 9 with the skew KLs, 5 with the bucket or the cap).
LIVE_CHUNK_TENSORS = 4
# Beside the chunk, fwd+bwd holds the (V, H) fp32 dL/dW twice at its peak (the saved one and
# grad_output times it): at 1024 x 512 x 32000 fp32, 161 MiB above the inputs with this
# budget (262-row chunks) against 1156 MiB eager, 257 MiB with 256 MiB, the same time.
CHUNK_BUDGET_BYTES = 128 * 2**20
# dL/dW += gᵀ h reads and writes the (V, H) accumulator once per chunk (2·rows·V·H flops for
# 8·V·H bytes): short chunks make it memory-bound (131-row chunks at V = 32000: fwd+bwd 17 %
# slower on the CPU than 262-row ones), so large vocabularies get at least this many rows.
MIN_CHUNK_ROWS = 256


def live_chunk_tensors(options: FusedLinearKDOptions) -> int:
    """LIVE_CHUNK_TENSORS and what the chosen options add to it (see above)."""
    extra = 0 if options.divergence in CORE_DIVERGENCES else 6
    extra += 2 * (options.topk_tail == "bucket") + 2 * (options.softcap is not None)
    return LIVE_CHUNK_TENSORS + extra


def default_chunk_size(num_tokens: int, vocab: int, dtype: torch.dtype,
                       live: int = LIVE_CHUNK_TENSORS) -> int:
    """Tokens per chunk: as many as keep ``live`` (rows, V) tensors of ``dtype`` within
    CHUNK_BUDGET_BYTES, but at least MIN_CHUNK_ROWS (at least 1, at most ``num_tokens``)."""
    row_bytes = live * vocab * torch.finfo(dtype).bits // 8
    return max(1, min(num_tokens, max(MIN_CHUNK_ROWS, CHUNK_BUDGET_BYTES // row_bytes)))


@dataclass(frozen=True)
class FusedLinearKDOptions:
    """Everything but the tensors (see :func:`kdfast.reference.fused_linear_kd`); a
    ``num_items`` given as a tensor travels beside it."""
    divergence: str = "forward"
    beta: float = 0.5
    alpha: float = 0.1
    temperature: float = 1.0
    soft_weight: float = 1.0
    hard_weight: float = 0.0
    ignore_index: int = -100
    num_items: int | None = None
    reduction: str = "mean"
    chunk_size: int | None = None
    topk_tail: str = "renormalize"
    logit_scale: float = 1.0
    softcap: float | None = None
    teacher_logit_scale: float = 1.0
    teacher_softcap: float | None = None
    scale_by_temperature_squared: bool = True

    @property
    def soft_scale(self) -> float:
        """What multiplies the divergence kernels' T²·D: soft_weight, over T² without the
        T² factor."""
        if self.scale_by_temperature_squared:
            return self.soft_weight
        return self.soft_weight / self.temperature**2

    def encoded(self) -> tuple[list[float], list[int], str]:
        """The options as the custom operator's arguments: the floats, the ints (a None cap
        or count as 0, which no valid one is; the flag as 0/1) and the names joined by
        commas."""
        floats = [0.0 if getattr(self, f) is None else getattr(self, f) for f in FLOAT_FIELDS]
        ints = [0 if getattr(self, f) is None else int(getattr(self, f)) for f in INT_FIELDS]
        return floats, ints, ",".join(getattr(self, f) for f in NAME_FIELDS)

    @staticmethod
    def decoded(floats: list[float], ints: list[int], names: str) -> FusedLinearKDOptions:
        values = dict(zip(FLOAT_FIELDS, floats, strict=True))
        values.update(zip(INT_FIELDS, ints, strict=True))
        values.update(zip(NAME_FIELDS, names.split(","), strict=True))
        for field in ("softcap", "teacher_softcap", "num_items", "chunk_size"):
            values[field] = values[field] or None
        values["scale_by_temperature_squared"] = bool(values["scale_by_temperature_squared"])
        return FusedLinearKDOptions(**values)


FLOAT_FIELDS = ("beta", "alpha", "temperature", "soft_weight", "hard_weight", "logit_scale",
                "softcap", "teacher_logit_scale", "teacher_softcap")
INT_FIELDS = ("ignore_index", "num_items", "chunk_size", "scale_by_temperature_squared")
NAME_FIELDS = ("divergence", "reduction", "topk_tail")


# --- the divergence of one chunk -------------------------------------------------------

def triton_loss_and_gradient(student: Tensor, teacher: Tensor, temperature: float,
                             divergence: str, beta: float, need_gradient: bool,
                             teacher_gradient: bool) -> tuple[Tensor, Tensor, None]:
    """The Triton core in the native kernel's form (loss and dL/ds of the per-row loss): its
    stats forward, then its backward with grad_output 1 (the chunk's logits are already in
    the accumulation dtype, so the gradient is too)."""
    loss, row_stats = triton_softmax_kl_with_stats_op(student, teacher, temperature,
                                                      divergence, beta)
    if not need_gradient:
        return loss, student.new_empty((0, 0)), None
    grad, _ = triton_softmax_kl_backward_op(torch.ones_like(loss), student, teacher, row_stats,
                                            temperature, divergence, beta, True,
                                            teacher_gradient)
    return loss, grad, None


def core_divergence(student: Tensor, teacher: Tensor, options: FusedLinearKDOptions,
                    need_gradient: bool) -> tuple[Tensor, Tensor | None] | None:
    """The ``"softmax_kl"`` core's fused kernel (native or Triton) on one chunk: the per-row
    T²·divergence and its gradient w.r.t. the student rows in one pass; None where no such
    kernel runs (a divergence it lacks, the reference chosen or nothing built)."""
    if options.divergence not in CORE_DIVERGENCES:
        return None
    backend = backends.choose(SOFTMAX_KL, None, student, teacher).backend
    kernel = {"native": getattr(torch.ops.kdfast, "softmax_kl", None) if backend == "native"
              else None, "triton": triton_loss_and_gradient}.get(backend)
    if kernel is None:
        return None
    loss, grad, _ = kernel(student, teacher, options.temperature, options.divergence,
                           options.beta, need_gradient, False)
    return loss, grad if need_gradient else None


def exp_difference(log_a: Tensor, log_m: Tensor) -> Tensor:
    """a / m entry-wise from logs; 0 where m = 0 (rows (rows, 1) broadcast)."""
    empty = log_m == NEG_INF
    return torch.where(empty, 0.0, (log_a - torch.where(empty, 0.0, log_m)).exp())


def skew_ratio(a: Tensor, b: Tensor, alpha: float) -> Tensor:
    """a / (α a + (1 − α) b) entry-wise, in [0, 1/α]; 0 where a = 0 (the mixture is clamped
    away from 0, which it only reaches where a = b = 0). In probabilities rather than logs:
    fewer passes than log_mixture's, and a term p log(p/m) loses nothing to it (p/m is
    bounded; p below the smallest normal number contributes below it)."""
    mixture = torch.lerp(b, a, alpha).clamp_min_(torch.finfo(a.dtype).tiny)
    return a / mixture


def torch_divergence(student: Tensor, teacher: Tensor, options: FusedLinearKDOptions,
                     need_gradient: bool) -> tuple[Tensor, Tensor | None]:
    r"""T²·D(p, q) per row and its gradient w.r.t. the student rows s, by torch ops on one
    chunk, for every divergence (p = softmax(t/T), q = softmax(s/T)).

    Derivation: with u = q ⊙ ∂D/∂q (entry-wise), the softmax's Jacobian gives
    ∂D/∂s = (u − q Σ_v u_v) / T, so d(T² D)/ds = T (u − q Σ u). Per divergence
    (m the divergence's mixture):

    * forward KL(p‖q): u = −p;  reverse KL(q‖p): u = q (log q − log p);
    * JSD(β), m = βp + (1−β)q: u = (1−β) q (log q − log m) (the p-terms' derivatives cancel);
    * SKL_α = KL(p‖m), m = αp + (1−α)q: u = −(1−α) q p / m;
    * SRKL_α = KL(q‖m), m = αq + (1−α)p: u = q log(q / m) − α q² / m (both with the ratio
      of :func:`skew_ratio`);
    * TV = ½ Σ|p − q|: u = ½ q sign(q − p).

    Terms with q = 0 (a −inf logit) are 0, so −inf entries get a zero gradient.
    """
    temperature, divergence = options.temperature, options.divergence
    beta, alpha = options.beta, options.alpha
    log_q = F.log_softmax(student / temperature, dim=1)
    log_p = F.log_softmax(teacher / temperature, dim=1)
    if (divergence == "jsd" and beta == 0.0) or (divergence == "skew_forward" and alpha == 0):
        divergence = "forward"
    elif (divergence == "jsd" and beta == 1.0) or (divergence == "skew_reverse" and alpha == 0):
        divergence = "reverse"
    if divergence == "forward":
        value, u = row_kl(log_p, log_q), -log_p.exp()
    elif divergence == "reverse":
        u = kl_terms(log_q, log_p)
        value = u.sum(dim=1)
    elif divergence == "jsd":
        log_m = log_mixture(log_p, log_q, beta)
        terms = kl_terms(log_q, log_m)
        value = beta * row_kl(log_p, log_m) + (1.0 - beta) * terms.sum(dim=1)
        u = (1.0 - beta) * terms
    elif divergence == "skew_forward":
        p, q = log_p.exp(), log_q.exp()
        ratio = skew_ratio(p, q, alpha)
        value, u = torch.xlogy(p, ratio).sum(dim=1), ratio.mul_(q).mul_(alpha - 1.0)
    elif divergence == "skew_reverse":
        p, q = log_p.exp(), log_q.exp()
        ratio = skew_ratio(q, p, alpha)
        terms = torch.xlogy(q, ratio)
        value, u = terms.sum(dim=1), terms.sub_(ratio.mul_(q), alpha=alpha)
    else:
        q, p = log_q.exp(), log_p.exp()
        value, u = 0.5 * (p - q).abs().sum(dim=1), 0.5 * q * torch.sign(q - p)
    value = temperature**2 * value
    if not need_gradient:
        return value, None
    q = log_q.exp()
    return value, temperature * (u - q * u.sum(dim=1, keepdim=True))


def chunk_divergence(student: Tensor, teacher: Tensor, options: FusedLinearKDOptions,
                     need_gradient: bool) -> tuple[Tensor, Tensor | None]:
    fused = core_divergence(student, teacher, options, need_gradient)
    return fused if fused is not None else torch_divergence(student, teacher, options,
                                                            need_gradient)


# --- one chunk: rows compared, and the gradient carried back to the logits -------------

def linear_in(dtype: torch.dtype, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x Wᵀ + b computed in ``dtype`` (the accumulation dtype)."""
    return F.linear(x.to(dtype), weight, None if bias is None else bias.to(dtype))


def bucket_gradient(grad_rows: Tensor, student_rows: Tensor, log_q: Tensor,
                    indices: Tensor) -> Tensor:
    """dL/ds from dL/d(bucket rows) (rows, k + 1). With c_i = log q_{K_i} and
    c_k = log Σ_{v∉K} q_v (q = softmax(s)): ∂c_i/∂s_v = [v = K_i] − q_v and
    ∂c_k/∂s_v = [v ∉ K] q_v / e^{c_k} − q_v, so
    dL/ds_v = Σ_i g_i [v = K_i] + g_k [v ∉ K] q_v e^{−c_k} − q_v Σ_j g_j."""
    k = indices.shape[1]
    tail_grad, log_tail = grad_rows[:, k:], student_rows[:, k:]
    share = exp_difference(log_q.scatter(1, indices, NEG_INF), log_tail)
    grad = (tail_grad * share).scatter_add_(1, indices, grad_rows[:, :k])
    return grad.sub_(log_q.exp() * grad_rows.sum(dim=1, keepdim=True))


def compared_rows(student: Tensor, teacher: tuple, rows: Tensor, options: FusedLinearKDOptions
                  ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(student rows, teacher rows) the divergence compares for the chunk's rows, the top-k
    ids (or None) and the student's log-probabilities where the bucket computed them."""
    t_hidden, t_weight, t_bias, t_logits, values, indices = teacher
    acc, vocab = student.dtype, student.shape[1]
    if values is not None:
        ids = indices[rows]
        if options.topk_tail == "renormalize":
            return student.gather(1, ids), values[rows].to(acc), ids, None
        log_q = F.log_softmax(student, dim=1)
        return *bucket_rows(log_q, values[rows].to(acc), ids), ids, log_q
    if t_logits is not None:
        teacher_logits = t_logits[rows].to(acc)
    else:
        teacher_logits = capped(linear_in(acc, t_hidden[rows], t_weight, t_bias),
                                options.teacher_logit_scale, options.teacher_softcap)
    width = max(vocab, teacher_logits.shape[1])
    return padded(student, width), padded(teacher_logits, width), None, None


def chunk_loss(student: Tensor, teacher: tuple, rows: Tensor, labels: Tensor | None,
               options: FusedLinearKDOptions, need_gradient: bool
               ) -> tuple[Tensor, Tensor | None]:
    """ℓ of the chunk's rows (rows,) from its student logits (rows, V_s) and, when asked,
    dℓ/d(student logits) (rows, V_s). Every (rows, V) temporary is freed or updated in place
    once used: with a full teacher and a kernel divergence three are alive at the peak (the
    student's and teacher's logits, the kernel's gradient)."""
    student_rows, teacher_rows, ids, log_q = compared_rows(student, teacher, rows, options)
    divergence, grad_rows = chunk_divergence(student_rows, teacher_rows, options,
                                             need_gradient)
    del teacher_rows  # the teacher's chunk is not needed past the divergence
    loss = options.soft_scale * divergence
    grad = None
    if need_gradient:
        if ids is None:
            grad = grad_rows[:, :student.shape[1]]
        elif options.topk_tail == "renormalize":
            grad = student.new_zeros(student.shape).scatter_add_(1, ids, grad_rows)
        else:
            grad = bucket_gradient(grad_rows, student_rows, log_q, ids)
        del grad_rows, student_rows
        grad.mul_(options.soft_scale)  # a fresh tensor (kernel output, formula, scatter)
    if options.hard_weight > 0:
        targets = labels[rows]
        log_q = F.log_softmax(student, dim=1) if log_q is None else log_q
        loss = loss - options.hard_weight * log_q.gather(1, targets[:, None]).squeeze(1)
        if need_gradient:
            probs = log_q.exp_()  # log_q is not needed past the gather
            probs[torch.arange(len(rows), device=rows.device), targets] -= 1.0
            grad.add_(probs, alpha=options.hard_weight)
    return loss, grad


def through_cap(grad: Tensor, logits: Tensor, logit_scale: float, softcap: float | None
                ) -> Tensor:
    """dL/d(h Wᵀ + b) from dL/ds, s = c tanh(σ z / c): ds/dz = σ (1 − (s/c)²); in place."""
    if softcap is not None:
        grad.mul_((logits / softcap).square_().neg_().add_(1.0))
    return grad.mul_(logit_scale) if logit_scale != 1.0 else grad


def sweep(student: tuple, teacher: tuple, labels: Tensor | None,
          options: FusedLinearKDOptions, rows_kept: Tensor, row_scale,
          needs: tuple[bool, bool, bool]):
    """One pass over chunks of the kept tokens: the per-token loss (N,) (0 at ignored ones)
    and the gradients of Σ_n row_scale_n · ℓ_n w.r.t. hidden, weight and bias (None where not
    in ``needs``), all in the accumulation dtype. ``row_scale`` is a number or an (N,)
    tensor. ``teacher`` = (hidden, weight, bias, logits, top-k values, top-k indices).

    Per chunk of rows r (s = h Wᵀ + b before the cap, so with g = dL/ds (rows, V),
    dL/dh = g W, dL/dW = gᵀ h, dL/db = Σ_rows g): the student logits of r, ℓ_r and g from
    :func:`chunk_loss`, g carried through the cap and scaled by row_scale_r, then the GEMMs.
    """
    hidden, weight, bias = student
    acc = accumulation_dtype(hidden)
    weight = weight.to(acc)
    if teacher[1] is not None:
        teacher = (teacher[0], teacher[1].to(acc), *teacher[2:])
    num_tokens, vocab = hidden.shape[0], weight.shape[0]
    need_gradient = any(needs)
    loss = hidden.new_zeros(num_tokens, dtype=acc)
    grad_hidden = torch.zeros_like(hidden, dtype=acc) if needs[0] else None
    grad_weight = torch.zeros_like(weight) if needs[1] else None
    grad_bias = weight.new_zeros(vocab) if needs[2] else None
    chunk = options.chunk_size or default_chunk_size(num_tokens, vocab, acc,
                                                     live_chunk_tensors(options))
    for start in range(0, rows_kept.numel(), chunk):
        rows = rows_kept[start:start + chunk]
        hidden_rows = hidden[rows].to(acc)
        logits = capped(linear_in(acc, hidden_rows, weight, bias), options.logit_scale,
                        options.softcap)
        loss[rows], grad = chunk_loss(logits, teacher, rows, labels, options, need_gradient)
        if not need_gradient:
            del logits
            continue
        grad = through_cap(grad, logits, options.logit_scale, options.softcap)
        del logits
        grad.mul_(row_scale[rows, None] if isinstance(row_scale, Tensor) else row_scale)
        if needs[0]:
            grad_hidden[rows] = grad @ weight
        if needs[1]:
            grad_weight.addmm_(grad.T, hidden_rows)
        if needs[2]:
            grad_bias += grad.sum(dim=0)
        del grad  # before the next chunk's logits
    return loss, grad_hidden, grad_weight, grad_bias


def mean_denominator(options: FusedLinearKDOptions, kept_count: int,
                     num_items: Tensor | None) -> int:
    """What the sum over kept tokens is divided by: ``num_items`` (or the kept count, at
    least 1, so an all-ignored batch gives 0) for ``"mean"``, 1 for the other reductions."""
    if options.reduction != "mean":
        return 1
    if num_items is not None:
        count = int(num_items.item())
        if count < 1:
            raise ValueError(f"num_items must be an int >= 1, got {count}")
        return count
    return options.num_items if options.num_items is not None else max(kept_count, 1)


# --- the custom operator and its autograd formula --------------------------------------

OP_NAME = "kdfast_llm::fused_linear_kd"


@torch.library.custom_op(OP_NAME, mutates_args=())
def fused_linear_kd_op(hidden: Tensor, weight: Tensor, bias: Tensor | None,
                       teacher_hidden: Tensor | None, teacher_weight: Tensor | None,
                       teacher_bias: Tensor | None, teacher_logits: Tensor | None,
                       topk_values: Tensor | None, topk_indices: Tensor | None,
                       labels: Tensor | None, num_items: Tensor | None,
                       row_scale: Tensor | None, floats: list[float], ints: list[int],
                       names: str, needs: list[bool]
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, dL/dhidden, dL/dweight, dL/dbias) of the chunked sweep on flattened inputs:
    the loss reduced (() for mean/sum, (N,) for ``"none"``), the gradients those of the
    reduced loss (``row_scale`` None) or of Σ row_scale_n ℓ_n, in the accumulation dtype,
    empty (0,) where ``needs`` says no. ``floats, ints, names`` are
    :meth:`FusedLinearKDOptions.encoded`."""
    opts = FusedLinearKDOptions.decoded(floats, ints, names)
    teacher = (teacher_hidden, teacher_weight, teacher_bias, teacher_logits, topk_values,
               None if topk_indices is None else topk_indices.long())
    rows_kept = kept_tokens(labels, hidden.shape[0], opts.ignore_index,
                            hidden.device).nonzero().squeeze(1)
    denominator = mean_denominator(opts, rows_kept.numel(), num_items)
    scale = 1.0 / denominator if row_scale is None else row_scale.to(accumulation_dtype(hidden))
    per_token, *grads = sweep((hidden, weight, bias), teacher, labels, opts, rows_kept, scale,
                              tuple(needs))
    loss = per_token if opts.reduction == "none" else per_token.sum() / denominator
    return loss, *(hidden.new_empty(0, dtype=per_token.dtype) if g is None else g
                   for g in grads)


@fused_linear_kd_op.register_fake
def _(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
      topk_values, topk_indices, labels, num_items, row_scale, floats, ints, names, needs):
    acc = accumulation_dtype(hidden)
    per_token = FusedLinearKDOptions.decoded(floats, ints, names).reduction == "none"
    shapes = (hidden.shape, weight.shape, (weight.shape[0],))
    loss = hidden.new_empty(hidden.shape[:1] if per_token else (), dtype=acc)
    return loss, *(hidden.new_empty(shape if need else (0,), dtype=acc)
                   for shape, need in zip(shapes, needs, strict=True))


TENSOR_INPUTS = 12  # the operator's tensor arguments, before the options and needs


def setup_context(ctx, inputs, output):
    ctx.options = inputs[TENSOR_INPUTS:-1]
    tensors = inputs[:TENSOR_INPUTS]
    ctx.save_for_backward(*tensors, *output[1:])
    ctx.mark_non_differentiable(*output[1:])
    # The gradient outputs get no gradient: without this autograd passes zeros of their
    # shapes to the backward (a (V, H) fp32 tensor more at its peak).
    ctx.set_materialize_grads(False)


def backward(ctx, grad_loss, *_):
    saved = ctx.saved_tensors
    tensors, grads = saved[:TENSOR_INPUTS], saved[TENSOR_INPUTS:]
    student, teacher = tensors[:3], tensors[3:9]
    labels, num_items = tensors[9], tensors[10]
    options = FusedLinearKDOptions.decoded(*ctx.options)
    needs = tuple(ctx.needs_input_grad[:3])
    if creates_graph():
        found = differentiable_grads(student, teacher, labels, num_items, options, needs,
                                     grad_loss)
    elif options.reduction == "none":
        _, *found = fused_linear_kd_op(*student, *teacher, labels, num_items, grad_loss,
                                       *ctx.options, list(needs))
        found = [g if need else None for g, need in zip(found, needs, strict=True)]
    else:
        found = [grad_loss * g if need else None for g, need in zip(grads, needs, strict=True)]
    found = [None if g is None else g.to(x.dtype) for g, x in zip(found, student, strict=True)]
    return *found, *(None,) * (TENSOR_INPUTS - 3 + 4)


fused_linear_kd_op.register_autograd(backward, setup_context=setup_context)


def differentiable_grads(student, teacher, labels, num_items, options, needs, grad_loss):
    """The student's gradients with a graph (a ``create_graph=True`` backward): the
    reference's, differentiated (:mod:`kdfast.ops._higher_order`)."""
    present = [i for i, x in enumerate(student) if x is not None]

    def reference(*tensors):
        args = list(student)
        for i, x in zip(present, tensors, strict=True):
            args[i] = x
        return reference_loss(args, teacher, labels, num_items, options)
    found = reference_grads(reference, [student[i] for i in present],
                            [needs[i] for i in present], grad_loss)
    grads = [None] * 3
    for i, g in zip(present, found, strict=True):
        grads[i] = g
    return grads


def reference_loss(student, teacher, labels, num_items, options: FusedLinearKDOptions
                   ) -> Tensor:
    """The eager reference on flattened inputs, with the options of the chunked sweep."""
    hidden, weight, bias = student
    t_hidden, t_weight, t_bias, t_logits, values, indices = teacher
    settings = asdict(options)
    del settings["chunk_size"]
    if num_items is not None:
        settings["num_items"] = num_items
    return fused_linear_kd(hidden, weight, t_hidden, t_weight, teacher_logits=t_logits,
                           teacher_topk=None if values is None else (values, indices),
                           student_bias=bias, teacher_bias=t_bias, labels=labels, **settings)


def native_fused_linear_kd(student, teacher, labels, num_items,
                           options: FusedLinearKDOptions) -> Tensor:
    """Core ``"fused_linear_kd"`` chunked (the operator ``kdfast_llm::fused_linear_kd``) on
    flattened inputs: ``student`` = (hidden (N, H), weight (V, H), bias (V,) or None),
    ``teacher`` = (hidden, weight, bias, logits, top-k values, top-k indices), the unused ones
    None; ``num_items`` a 0-d tensor or None (an int one is in ``options``). The teacher is
    detached: it never gets a gradient."""
    grad_on = torch.is_grad_enabled() and options.reduction != "none"  # "none": backward
    needs = [grad_on and x is not None and x.requires_grad for x in student]
    teacher = tuple(None if x is None else x.detach() for x in teacher)
    with autocast_off(student[0]):
        loss, *_ = fused_linear_kd_op(*student, *teacher, labels, num_items, None,
                                      *options.encoded(), needs)
    return loss


backends.register(CORE, "reference", reference_loss)
backends.register(CORE, "native", native_fused_linear_kd)
