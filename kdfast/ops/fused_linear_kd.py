"""The ``"fused_linear_kd"`` core: the student's lm_head fused with the KD loss, chunked over
tokens so that the (N, V) logits never exist at once (a first slice; the formula is
:mod:`kdfast.reference.fused_linear_kd`).

Not in this slice (left for later): top-k teachers, skew KL, total variation, softcap,
logit_scale, teacher and student vocabularies of different sizes, Triton, and
``torch.compile(fullgraph=True)`` (the sweep picks the kept tokens with ``nonzero``).

Backends: ``reference`` (the eager formula) and ``native`` (:class:`ChunkedFusedLinearKD`,
built from torch GEMMs and the ``"softmax_kl"`` core, so it runs on any device).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdfast import backends
from kdfast._precision import accumulation_dtype, autocast_off
from kdfast.ops._higher_order import creates_graph, reference_grads
from kdfast.ops.softmax_kl import CORE as SOFTMAX_KL
from kdfast.reference.fused_linear_kd import fused_linear_kd, kept_tokens

CORE = "fused_linear_kd"

# One chunk keeps about this many (rows, V) tensors in the accumulation dtype alive: the
# student logits, the teacher logits, dL/dlogits and the cross-entropy softmax.
LIVE_CHUNK_TENSORS = 4
CHUNK_BUDGET_BYTES = 256 * 2**20


def default_chunk_size(num_tokens: int, vocab: int, dtype: torch.dtype) -> int:
    """Tokens per chunk: as many as keep LIVE_CHUNK_TENSORS (rows, V) tensors of ``dtype``
    within CHUNK_BUDGET_BYTES (at least 1, at most ``num_tokens``)."""
    row_bytes = LIVE_CHUNK_TENSORS * vocab * torch.finfo(dtype).bits // 8
    return max(1, min(num_tokens, CHUNK_BUDGET_BYTES // row_bytes))


@dataclass(frozen=True)
class FusedLinearKDOptions:
    """Everything but the tensors (see :func:`kdfast.reference.fused_linear_kd`)."""
    divergence: str = "forward"
    beta: float = 0.5
    temperature: float = 1.0
    soft_weight: float = 1.0
    hard_weight: float = 0.0
    ignore_index: int = -100
    num_items: int | None = None
    reduction: str = "mean"
    chunk_size: int | None = None


def divergence_and_gradient(student: torch.Tensor, teacher: torch.Tensor,
                            options: FusedLinearKDOptions, need_gradient: bool
                            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``"softmax_kl"`` core on one chunk of logits: the per-row T²·divergence and, when
    asked, its gradient w.r.t. the student logits, both in the accumulation dtype. The native
    core gives both in one fused pass; another (the reference, Triton) is differentiated."""
    args = (options.temperature, options.divergence, options.beta)
    impl = backends.choose(SOFTMAX_KL, None, student, teacher)
    if impl.backend == "native":
        loss, grad, _ = torch.ops.kdfast.softmax_kl(student, teacher, *args, need_gradient,
                                                    False)
        return loss, grad if need_gradient else None
    if not need_gradient:
        return impl.fn(student, teacher, *args), None
    with torch.enable_grad():
        leaf = student.detach().requires_grad_()
        loss = impl.fn(leaf, teacher, *args)
        (grad,) = torch.autograd.grad(loss.sum(), leaf)
    return loss.detach(), grad


def linear_in(dtype: torch.dtype, x: torch.Tensor | None, weight: torch.Tensor | None,
              bias: torch.Tensor | None) -> torch.Tensor:
    """x Wᵀ + b computed in ``dtype`` (the accumulation dtype)."""
    return F.linear(x.to(dtype), weight, None if bias is None else bias.to(dtype))


def sweep(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
          labels, options: FusedLinearKDOptions, rows_kept: torch.Tensor, row_scale,
          needs: tuple[bool, bool, bool]):
    """One pass over chunks of the kept tokens: the per-token loss (N,) (0 at ignored ones)
    and the gradients of Σ_n row_scale_n · ℓ_n w.r.t. hidden, weight and bias (None where not
    in ``needs``), all in the accumulation dtype. ``row_scale`` is a number or an (N,)
    tensor.

    Per chunk of rows r (derivation: s = h Wᵀ + b, so with g = dL/ds (rows, V),
    dL/dh = g W, dL/dW = gᵀ h, dL/db = Σ_rows g):

        s = h_r Wᵀ + b,  t = teacher logits of r,
        ℓ_r = soft · T²·div(p_t, p_s) + hard · CE(s, y_r),
        g = soft · d(T²·div)/ds + hard · (softmax(s) − onehot(y_r)),  scaled by row_scale_r.
    """
    acc = accumulation_dtype(hidden)
    weight = weight.to(acc)
    if teacher_weight is not None:
        teacher_weight = teacher_weight.to(acc)
    num_tokens, vocab = hidden.shape[0], weight.shape[0]
    need_gradient = any(needs)
    loss = hidden.new_zeros(num_tokens, dtype=acc)
    grad_hidden = torch.zeros_like(hidden, dtype=acc) if needs[0] else None
    grad_weight = torch.zeros_like(weight) if needs[1] else None
    grad_bias = weight.new_zeros(vocab) if needs[2] else None
    chunk = options.chunk_size or default_chunk_size(num_tokens, vocab, acc)
    for start in range(0, rows_kept.numel(), chunk):
        rows = rows_kept[start:start + chunk]
        hidden_rows = hidden[rows].to(acc)
        student = linear_in(acc, hidden_rows, weight, bias)
        if teacher_logits is not None:
            teacher = teacher_logits[rows].to(acc)
        else:
            teacher = linear_in(acc, teacher_hidden[rows], teacher_weight, teacher_bias)
        divergence, grad = divergence_and_gradient(student, teacher, options, need_gradient)
        chunk_loss = options.soft_weight * divergence
        if need_gradient:
            grad = grad * options.soft_weight
        if options.hard_weight > 0:
            targets = labels[rows]
            log_p = F.log_softmax(student, dim=1)
            cross_entropy = -log_p.gather(1, targets[:, None]).squeeze(1)
            chunk_loss = chunk_loss + options.hard_weight * cross_entropy
            if need_gradient:
                probs = log_p.exp_()
                probs[torch.arange(len(rows), device=rows.device), targets] -= 1.0
                grad.add_(probs, alpha=options.hard_weight)
        loss[rows] = chunk_loss
        if not need_gradient:
            continue
        scale = row_scale[rows, None] if isinstance(row_scale, torch.Tensor) else row_scale
        grad = grad * scale
        if needs[0]:
            grad_hidden[rows] = grad @ weight
        if needs[1]:
            grad_weight.addmm_(grad.T, hidden_rows)
        if needs[2]:
            grad_bias += grad.sum(dim=0)
    return loss, grad_hidden, grad_weight, grad_bias


def mean_denominator(options: FusedLinearKDOptions, kept_count: int) -> int:
    """What the sum over kept tokens is divided by: ``num_items`` (or the kept count, at
    least 1, so an all-ignored batch gives 0) for ``"mean"``, 1 for the other reductions."""
    if options.reduction != "mean":
        return 1
    return options.num_items if options.num_items is not None else max(kept_count, 1)


class ChunkedFusedLinearKD(torch.autograd.Function):
    """The chunked sweep as one autograd Function over flattened (N, H) hidden states.

    Scalar reductions compute the gradients in the forward (scaled by grad_output in the
    backward) and keep only (N, H), (V, H) and (V,) tensors; ``"none"`` keeps the inputs and
    reruns the sweep in the backward with grad_output as the per-token scale. The teacher
    inputs and labels never get a gradient (a frozen teacher)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
                teacher_logits, labels, options):
        teacher = (teacher_hidden, teacher_weight, teacher_bias, teacher_logits)
        teacher = tuple(None if x is None else x.detach() for x in teacher)
        rows_kept = kept_tokens(labels, hidden.shape[0], options.ignore_index,
                                hidden.device).nonzero().squeeze(1)
        needs = tuple(ctx.needs_input_grad[:3])
        per_token_only = options.reduction == "none"
        denominator = mean_denominator(options, rows_kept.numel())
        per_token, *grads = sweep(hidden, weight, bias, *teacher, labels, options, rows_kept,
                                  1.0 / denominator,
                                  (False, False, False) if per_token_only else needs)
        loss = per_token if per_token_only else per_token.sum() / denominator
        ctx.options, ctx.teacher, ctx.labels, ctx.rows_kept = options, teacher, labels, rows_kept
        ctx.save_for_backward(hidden, weight, bias, *grads)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, *grads = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        student = (hidden, weight, bias)
        unused = (None,) * 6
        if creates_graph():
            present = [i for i, x in enumerate(student) if x is not None]

            def reference(*tensors):
                args = list(student)
                for i, x in zip(present, tensors, strict=True):
                    args[i] = x
                return reference_loss(args, ctx.teacher, ctx.labels, ctx.options)
            found = reference_grads(reference, [student[i] for i in present],
                                    [needs[i] for i in present], grad_loss)
            grads = [None] * 3
            for i, g in zip(present, found, strict=True):
                grads[i] = g
            return *grads, *unused
        if ctx.options.reduction == "none":
            _, *grads = sweep(hidden, weight, bias, *ctx.teacher, ctx.labels, ctx.options,
                              ctx.rows_kept, grad_loss.to(accumulation_dtype(hidden)), needs)
            scaled = grads
        else:
            scaled = [None if g is None else grad_loss * g for g in grads]
        in_dtypes = (None if g is None else g.to(x.dtype)
                     for g, x in zip(scaled, student, strict=True))
        return *in_dtypes, *unused


def reference_loss(student, teacher, labels, options: FusedLinearKDOptions) -> torch.Tensor:
    """The eager reference on flattened inputs, with the options of the chunked sweep."""
    hidden, weight, bias = student
    teacher_hidden, teacher_weight, teacher_bias, teacher_logits = teacher
    return fused_linear_kd(hidden, weight, teacher_hidden, teacher_weight,
                           teacher_logits=teacher_logits, student_bias=bias,
                           teacher_bias=teacher_bias, labels=labels,
                           divergence=options.divergence, beta=options.beta,
                           temperature=options.temperature, soft_weight=options.soft_weight,
                           hard_weight=options.hard_weight, ignore_index=options.ignore_index,
                           num_items=options.num_items, reduction=options.reduction)


def native_fused_linear_kd(student, teacher, labels, options: FusedLinearKDOptions
                           ) -> torch.Tensor:
    """Core ``"fused_linear_kd"`` chunked (:class:`ChunkedFusedLinearKD`) on flattened
    inputs: ``student`` = (hidden (N, H), weight (V, H), bias (V,) or None), ``teacher`` =
    (hidden, weight, bias, logits), the unused ones None."""
    with autocast_off(student[0]):
        return ChunkedFusedLinearKD.apply(*student, *teacher, labels, options)


backends.register(CORE, "reference", reference_loss)
backends.register(CORE, "native", native_fused_linear_kd)
