"""Logit distillation for language models with the lm_head fused into the loss, chunked over
tokens: ``fused_linear_kd_loss`` and ``FusedLinearKDLoss`` (a first slice).

Not yet offered (later slices): top-k (sparse) teachers, skew KL / skew reverse KL, total
variation, ``softcap`` / ``logit_scale``, teacher and student vocabularies of different sizes,
a Triton path and ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import torch

from kdfast import _checks, backends
from kdfast.losses._module import FunctionalLoss
from kdfast.ops.fused_linear_kd import CORE, FusedLinearKDOptions
from kdfast.reference.softmax_kl import DIVERGENCES

HIDDEN_LAYOUT = "(N, H) or (B, T, H)"


def check_fused_linear_kd_options(divergence: str = "forward", beta: float = 0.5,
                                  temperature: float = 1.0, soft_weight: float = 1.0,
                                  hard_weight: float = 0.0, ignore_index: int = -100,
                                  reduction: str = "mean", chunk_size: int | None = None
                                  ) -> None:
    _checks.check_choice("divergence", divergence, DIVERGENCES)
    if not 0.0 <= _checks.check_real("beta", beta) <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    _checks.check_positive("temperature", temperature)
    _checks.check_positive("soft_weight", soft_weight, inclusive=True)
    _checks.check_positive("hard_weight", hard_weight, inclusive=True)
    _checks.check_int("ignore_index", ignore_index, minimum=-(2**63))
    _checks.check_choice("reduction", reduction, _checks.REDUCTIONS)
    if chunk_size is not None:
        _checks.check_int("chunk_size", chunk_size)


def check_weight(name: str, weight, hidden_name: str, hidden: torch.Tensor) -> torch.Tensor:
    """A (V, H) lm_head weight on the hidden states' device with their H."""
    _checks.check_tensor(name, weight, 2, "(vocab_size, hidden_size)")
    if weight.device != hidden.device:
        raise ValueError(f"{name} is on {weight.device} but {hidden_name} is on "
                         f"{hidden.device}; move both to one device with .to(device)")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{name} has hidden size {weight.shape[1]} but {hidden_name} has "
                         f"{hidden.shape[-1]}; pass the lm_head weight (vocab_size, "
                         f"hidden_size) of the model whose hidden states these are")
    return weight


def check_bias(name: str, bias, weight: torch.Tensor) -> None:
    if bias is None:
        return
    _checks.check_tensor(name, bias, 1, "(vocab_size,)")
    if bias.shape[0] != weight.shape[0] or bias.device != weight.device:
        raise ValueError(f"{name} must have shape ({weight.shape[0]},) on {weight.device} "
                         f"(one entry per vocabulary id), got {tuple(bias.shape)} on "
                         f"{bias.device}")


def check_teacher(student_hidden, student_weight, teacher_hidden, teacher_weight,
                  teacher_logits, teacher_bias) -> None:
    """Exactly one teacher form, of the student's tokens and vocabulary size."""
    hidden_form = teacher_hidden is not None or teacher_weight is not None
    if hidden_form == (teacher_logits is not None):
        raise ValueError("pass exactly one teacher: teacher_hidden and teacher_weight (its "
                         "hidden states and lm_head weight), or teacher_logits (N, V); got "
                         + ("both" if hidden_form else "neither"))
    if hidden_form and (teacher_hidden is None or teacher_weight is None):
        missing = "teacher_hidden" if teacher_hidden is None else "teacher_weight"
        raise ValueError(f"{missing} is missing: the hidden-state teacher needs both "
                         "teacher_hidden and teacher_weight")
    if teacher_logits is not None and teacher_bias is not None:
        raise ValueError("teacher_bias goes with teacher_hidden and teacher_weight; with "
                         "teacher_logits add the bias to the logits instead")
    name = "teacher_hidden" if hidden_form else "teacher_logits"
    teacher = teacher_hidden if hidden_form else teacher_logits
    _checks.check_tensor(name, teacher, (2, 3),
                         HIDDEN_LAYOUT if hidden_form else "(N, V) or (B, T, V)")
    if teacher.device != student_hidden.device:
        raise ValueError(f"student_hidden is on {student_hidden.device} but {name} is on "
                         f"{teacher.device}; move both to one device with .to(device)")
    tokens, got = student_hidden.shape[:-1], teacher.shape[:-1]
    if got.numel() != tokens.numel():
        raise ValueError(f"student_hidden and {name} must have the same batch size (one row "
                         f"per token), got {tuple(tokens)} and {tuple(got)} tokens; pass the "
                         "teacher's outputs for the same tokens")
    vocab = student_weight.shape[0]
    if hidden_form:
        check_weight("teacher_weight", teacher_weight, "teacher_hidden", teacher_hidden)
        check_bias("teacher_bias", teacher_bias, teacher_weight)
    teacher_vocab = teacher_weight.shape[0] if hidden_form else teacher_logits.shape[-1]
    if teacher_vocab != vocab:
        what = "teacher_weight" if hidden_form else "teacher_logits"
        raise ValueError(f"{what} has vocabulary size {teacher_vocab} but student_weight has "
                         f"{vocab}; different vocabularies are not yet supported: pad or "
                         "slice the teacher's to the student's")


def check_token_labels(labels, num_tokens: int, vocab: int, ignore_index: int,
                       device: torch.device) -> torch.Tensor:
    """Integer labels, one per token (any shape of N entries), each a vocabulary id or
    ``ignore_index``: returned flat, as int64."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor of token ids, got "
                        f"{type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must hold integer token ids, got dtype {labels.dtype}; "
                        "pass labels.long()")
    if labels.numel() != num_tokens:
        raise ValueError(f"labels must have one id per token ({num_tokens}), got shape "
                         f"{tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but student_hidden is on {device}; "
                         "move it with labels.to(device)")
    labels = labels.reshape(-1).long()
    kept = labels[labels != ignore_index]
    if kept.numel() and not torch.compiler.is_compiling():
        low, high = int(kept.min()), int(kept.max())
        if low < 0 or high >= vocab:
            raise ValueError(f"labels must be token ids in [0, {vocab - 1}] or ignore_index "
                             f"({ignore_index}), got values in [{low}, {high}]")
    return labels


def flat(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.reshape(-1, x.shape[-1])


def items_count(num_items: torch.Tensor) -> int:
    """A 0-d integer tensor of kept tokens (Hugging Face's ``num_items_in_batch``) as an int."""
    if num_items.dim() != 0 or num_items.dtype.is_floating_point or num_items.is_complex() \
            or num_items.dtype == torch.bool:
        raise TypeError(f"num_items must be an int or a 0-d integer tensor, got a "
                        f"{num_items.dtype} tensor of shape {tuple(num_items.shape)}")
    return int(num_items.item())


def fused_linear_kd_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                         teacher_hidden: torch.Tensor | None = None,
                         teacher_weight: torch.Tensor | None = None, *,
                         teacher_logits: torch.Tensor | None = None,
                         student_bias: torch.Tensor | None = None,
                         teacher_bias: torch.Tensor | None = None,
                         labels: torch.Tensor | None = None, divergence: str = "forward",
                         beta: float = 0.5, temperature: float = 1.0,
                         soft_weight: float = 1.0, hard_weight: float = 0.0,
                         ignore_index: int = -100, num_items: int | torch.Tensor | None = None,
                         reduction: str = "mean", chunk_size: int | None = None,
                         backend: str | None = None) -> torch.Tensor:
    r"""Knowledge distillation of a language model's logits, its lm_head fused in.

    Student logits :math:`s = h W^\top (+ b)`, teacher logits given or :math:`h_t W_t^\top
    (+ b_t)`; per kept token (``labels != ignore_index``; every token without labels)

    .. math::
        \ell_n = w_{soft}\, T^2\, D(p_t \,\|\, p_s) + w_{hard}\, \mathrm{CE}(s_n, y_n),\quad
        p = \operatorname{softmax}(z / T)

    with D forward KL (default), reverse KL or the generalised JSD(β) of the ``"softmax_kl"``
    core (:mod:`kdfast.reference.softmax_kl`). The native backend loops over chunks of tokens
    and never holds the (N, V) logits: per chunk the logits GEMMs in fp32 (fp64 for fp64),
    the loss and dL/dlogits in one fused pass, then dL/dhidden and the accumulated dL/dW,
    dL/db (fp32), so that the backward only scales them by grad_output. The teacher is frozen:
    no gradient is ever computed for it.

    Args:
        student_hidden: (N, H) or (B, T, H) final hidden states of the student.
        student_weight: (V, H) its lm_head weight (may be tied to the embedding).
        teacher_hidden, teacher_weight: the teacher's hidden states (same tokens, its own H)
            and lm_head weight (V, H_t); or instead
        teacher_logits: (N, V) or (B, T, V) precomputed teacher logits.
        student_bias, teacher_bias: optional (V,) lm_head biases.
        labels: optional token ids, one per token; ``ignore_index`` marks excluded tokens.
            Needed for ``hard_weight > 0``.
        divergence: ``"forward"`` | ``"reverse"`` | ``"jsd"`` (with ``beta`` in [0, 1]).
        temperature: T > 0 (the T² factor is always applied in this slice).
        soft_weight, hard_weight: >= 0, the weights of the KD and cross-entropy terms.
        num_items: the global number of kept tokens for ``reduction="mean"`` (gradient
            accumulation, data parallel ranks), an int or a 0-d integer tensor (Hugging
            Face's ``num_items_in_batch``), else the local kept count.
        reduction: ``"mean"`` over kept tokens | ``"sum"`` | ``"none"`` (per token, the hidden
            states' leading shape, 0 at ignored tokens). Every token ignored gives 0.
        chunk_size: tokens per chunk (default from V and a 256 MiB budget).
        backend: ``None``/``"auto"``/``"native"`` (chunked) or ``"reference"`` (eager).

    Not yet offered: top-k teachers, skew KL, total variation, softcap, logit_scale,
    different vocabulary sizes, Triton, ``torch.compile(fullgraph=True)``.

    Example:
        >>> loss = kdfast.functional.fused_linear_kd_loss(  # doctest: +SKIP
        ...     out.hidden_states[-1], model.lm_head.weight, labels=labels,
        ...     teacher_logits=teacher_out.logits.detach())
    """
    check_fused_linear_kd_options(divergence, beta, temperature, soft_weight, hard_weight,
                                  ignore_index, reduction, chunk_size)
    if isinstance(num_items, torch.Tensor):  # Hugging Face passes num_items_in_batch so
        num_items = items_count(num_items)
    if num_items is not None:
        _checks.check_int("num_items", num_items)
    _checks.check_tensor("student_hidden", student_hidden, (2, 3), HIDDEN_LAYOUT)
    check_weight("student_weight", student_weight, "student_hidden", student_hidden)
    check_bias("student_bias", student_bias, student_weight)
    check_teacher(student_hidden, student_weight, teacher_hidden, teacher_weight,
                  teacher_logits, teacher_bias)
    num_tokens, vocab = student_hidden.shape[:-1].numel(), student_weight.shape[0]
    if labels is not None:
        labels = check_token_labels(labels, num_tokens, vocab, ignore_index,
                                    student_hidden.device)
    elif hard_weight > 0:
        raise ValueError("hard_weight > 0 needs labels (the token ids of the cross-entropy "
                         "term); pass labels= or set hard_weight=0")
    tensors = [student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
               teacher_bias, teacher_logits]
    present = _checks.promote(*(x for x in tensors if x is not None))
    found = iter(present)
    tensors = [None if x is None else next(found) for x in tensors]
    hidden, weight, bias, t_hidden, t_weight, t_bias, t_logits = tensors
    options = FusedLinearKDOptions(divergence, float(beta), float(temperature),
                                   float(soft_weight), float(hard_weight), int(ignore_index),
                                   num_items, reduction, chunk_size)
    impl = backends.choose(CORE, backend, hidden, weight)
    loss = impl.fn((flat(hidden), weight, bias), (flat(t_hidden), t_weight, t_bias,
                                                  flat(t_logits)), labels, options)
    return loss.reshape(student_hidden.shape[:-1]) if reduction == "none" else loss


class FusedLinearKDLoss(FunctionalLoss):
    """Module form of :func:`kdfast.functional.fused_linear_kd_loss`;
    ``forward(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, *,
    teacher_logits=None, student_bias=None, teacher_bias=None, labels=None, num_items=None)``.

    Example:
        >>> criterion = kdfast.FusedLinearKDLoss(temperature=2.0, hard_weight=0.5)
        >>> loss = criterion(h, model.lm_head.weight, labels=labels,  # doctest: +SKIP
        ...                  teacher_logits=teacher_logits)
    """

    function = staticmethod(fused_linear_kd_loss)
    validate = staticmethod(check_fused_linear_kd_options)

    def __init__(self, divergence: str = "forward", beta: float = 0.5,
                 temperature: float = 1.0, soft_weight: float = 1.0, hard_weight: float = 0.0,
                 ignore_index: int = -100, reduction: str = "mean",
                 chunk_size: int | None = None, backend: str | None = None) -> None:
        super().__init__(divergence=divergence, beta=beta, temperature=temperature,
                         soft_weight=soft_weight, hard_weight=hard_weight,
                         ignore_index=ignore_index, reduction=reduction,
                         chunk_size=chunk_size, backend=backend)

    def forward(self, student_hidden, student_weight, teacher_hidden=None,
                teacher_weight=None, *, teacher_logits=None, student_bias=None,
                teacher_bias=None, labels=None, num_items=None):
        return fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden,
                                    teacher_weight, teacher_logits=teacher_logits,
                                    student_bias=student_bias, teacher_bias=teacher_bias,
                                    labels=labels, num_items=num_items,
                                    **self._option_values())
