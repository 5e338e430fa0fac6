"""Logit distillation for language models with the lm_head fused into the loss, chunked over
tokens: ``fused_linear_kd_loss`` and ``FusedLinearKDLoss`` (docs/llm_distillation.md).

Not yet offered: a Triton sweep on CUDA (the native sweep runs there on torch GEMMs and the
``"softmax_kl"`` core's CUDA/Triton kernel).
"""

from __future__ import annotations

import math

import torch

from kdfast import _checks, backends
from kdfast.losses._module import FunctionalLoss
from kdfast.ops.fused_linear_kd import CORE, FusedLinearKDOptions
from kdfast.reference.fused_linear_kd import DIVERGENCES, TOPK_TAILS

HIDDEN_LAYOUT = "(N, H) or (B, T, H)"


def check_fused_linear_kd_options(divergence: str = "forward", beta: float = 0.5,
                                  alpha: float = 0.1, temperature: float = 1.0,
                                  soft_weight: float = 1.0, hard_weight: float = 0.0,
                                  ignore_index: int = -100, reduction: str = "mean",
                                  chunk_size: int | None = None,
                                  topk_tail: str = "renormalize", logit_scale: float = 1.0,
                                  softcap: float | None = None,
                                  teacher_logit_scale: float = 1.0,
                                  teacher_softcap: float | None = None,
                                  scale_by_temperature_squared: bool = True) -> None:
    _checks.check_choice("divergence", divergence, DIVERGENCES)
    _checks.check_flag("scale_by_temperature_squared", scale_by_temperature_squared)
    if not 0.0 <= _checks.check_real("beta", beta) <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not 0.0 <= _checks.check_real("alpha", alpha) < 1.0:
        raise ValueError(f"alpha must be in [0, 1) (the skew divergences' mixing weight; "
                         f"alpha = 1 makes them identically 0), got {alpha}")
    _checks.check_positive("temperature", temperature)
    _checks.check_positive("soft_weight", soft_weight, inclusive=True)
    _checks.check_positive("hard_weight", hard_weight, inclusive=True)
    _checks.check_int("ignore_index", ignore_index, minimum=-(2**63))
    _checks.check_choice("reduction", reduction, _checks.REDUCTIONS)
    if chunk_size is not None:
        _checks.check_int("chunk_size", chunk_size)
    _checks.check_choice("topk_tail", topk_tail, TOPK_TAILS)
    for name, scale in (("logit_scale", logit_scale), ("teacher_logit_scale",
                                                        teacher_logit_scale)):
        _checks.check_positive(name, scale)
    for name, cap in (("softcap", softcap), ("teacher_softcap", teacher_softcap)):
        if cap is not None:
            _checks.check_positive(name, cap)


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


# Divergences that are +inf on every token when one side lacks classes the other has mass on
# (a −inf-padded class): the student lacking them (forward-type) or the teacher (reverse-type).
INFINITE_IF_STUDENT_LACKS = ("forward", ("jsd", 0.0), ("skew_forward", 0.0))
INFINITE_IF_TEACHER_LACKS = ("reverse", ("jsd", 1.0), ("skew_reverse", 0.0))


def check_vocabularies(vocab: int, teacher_vocab: int, what: str, divergence: str,
                       beta: float, alpha: float) -> None:
    """Different vocabularies are padded with −inf; raise where that makes the loss +inf for
    every token (the side that lacks classes is the divergence's second argument)."""
    if vocab == teacher_vocab:
        return
    mixing = beta if divergence == "jsd" else alpha
    forms = {divergence, (divergence, mixing)}
    if vocab < teacher_vocab and forms & set(INFINITE_IF_STUDENT_LACKS):
        lacking = (f"the student lacks ids {vocab}..{teacher_vocab - 1}, which the teacher "
                   "gives mass, so KL(p_t || p_s) is +inf for every token")
    elif vocab > teacher_vocab and forms & set(INFINITE_IF_TEACHER_LACKS):
        lacking = (f"the teacher lacks ids {teacher_vocab}..{vocab - 1}, which the student "
                   "gives mass, so KL(p_s || p_t) is +inf for every token")
    else:
        return
    raise ValueError(f"{what} has vocabulary size {teacher_vocab} but student_weight has "
                     f"{vocab}: the shorter is padded with -inf, and {lacking}. Slice the "
                     "longer to the shared ids if the extra ones are padding, or use a "
                     "divergence that stays finite (jsd with 0 < beta < 1, skew_forward / "
                     "skew_reverse with alpha > 0, tv)")


def check_topk(teacher_topk, num_tokens: int, vocab: int, topk_tail: str,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices)`` (N, k) or (B, T, k): floating values, integer ids in
    [0, vocab) distinct per row (and for ``"bucket"`` log-probabilities), returned flat."""
    if not (isinstance(teacher_topk, tuple | list) and len(teacher_topk) == 2):
        raise TypeError("teacher_topk must be a pair (values, indices) of (N, k) tensors, "
                        f"got {type(teacher_topk).__name__}")
    values, indices = teacher_topk
    _checks.check_tensor("teacher_topk values", values, (2, 3), "(N, k) or (B, T, k)")
    if not isinstance(indices, torch.Tensor) or indices.is_floating_point() \
            or indices.is_complex() or indices.dtype == torch.bool:
        raise TypeError("teacher_topk indices must be an integer tensor of vocabulary ids "
                        f"(torch.topk's .indices), got {getattr(indices, 'dtype', indices)!r}")
    if indices.shape != values.shape or values.device != device or indices.device != device:
        raise ValueError(f"teacher_topk values and indices must have one shape on "
                         f"student_hidden's device {device}, got {tuple(values.shape)} on "
                         f"{values.device} and {tuple(indices.shape)} on {indices.device}")
    if values.shape[:-1].numel() != num_tokens:
        raise ValueError(f"teacher_topk must have one row per token ({num_tokens}), got "
                         f"shape {tuple(values.shape)}")
    k = values.shape[-1]
    if k > vocab:
        raise ValueError(f"teacher_topk has k = {k} ids per token but the student's "
                         f"vocabulary has {vocab}")
    values, indices = values.reshape(-1, k), indices.reshape(-1, k)
    if not torch.compiler.is_compiling():
        check_topk_values(values, indices, vocab, topk_tail)
    return values, indices


# How far above 0 logsumexp(values) may be and still be read as log-probabilities (rounding
# of stored bf16 log-probabilities), for topk_tail="bucket".
LOG_MASS_SLACK = 1e-2


def check_topk_values(values: torch.Tensor, indices: torch.Tensor, vocab: int,
                      topk_tail: str) -> None:
    """The data-dependent checks of a top-k teacher (skipped under torch.compile)."""
    low, high = int(indices.min()), int(indices.max())
    if low < 0 or high >= vocab:
        raise ValueError(f"teacher_topk indices must be ids in [0, {vocab - 1}] (the "
                         f"student's vocabulary), got values in [{low}, {high}]")
    ordered = indices.sort(dim=1).values
    if (ordered[:, 1:] == ordered[:, :-1]).any():
        raise ValueError("teacher_topk indices repeat an id within a row; pass distinct ids "
                         "(torch.topk's)")
    if topk_tail == "bucket":
        most = float(torch.logsumexp(values.detach().double(), dim=1).max())
        if most > LOG_MASS_SLACK:
            raise ValueError("topk_tail='bucket' reads the teacher's tail mass as 1 - sum "
                             "exp(values), so teacher_topk values must be log-probabilities "
                             f"(log_softmax of the teacher's logits), but a row's exp(values) "
                             f"sums to {math.exp(most):.4g} > 1; pass log-probabilities, or "
                             "topk_tail='renormalize' for raw logits")


def check_teacher(student_hidden, student_weight, teacher_hidden, teacher_weight,
                  teacher_logits, teacher_topk, teacher_bias, options: dict) -> None:
    """Exactly one teacher form, of the student's tokens; a full teacher's vocabulary may
    differ from the student's where the loss stays finite (:func:`check_vocabularies`)."""
    hidden_form = teacher_hidden is not None or teacher_weight is not None
    forms = hidden_form + (teacher_logits is not None) + (teacher_topk is not None)
    if forms != 1:
        raise ValueError("pass exactly one teacher: teacher_hidden and teacher_weight (its "
                         "hidden states and lm_head weight), teacher_logits (N, V) or "
                         "teacher_topk (values, indices) (N, k); got "
                         + ("several" if forms else "neither"))
    if hidden_form and (teacher_hidden is None or teacher_weight is None):
        missing = "teacher_hidden" if teacher_hidden is None else "teacher_weight"
        raise ValueError(f"{missing} is missing: the hidden-state teacher needs both "
                         "teacher_hidden and teacher_weight")
    if not hidden_form:
        given = [name for name, value, default in (
            ("teacher_bias", teacher_bias, None),
            ("teacher_logit_scale", options["teacher_logit_scale"], 1.0),
            ("teacher_softcap", options["teacher_softcap"], None)) if value != default]
        if given:
            raise ValueError(f"{', '.join(given)} go(es) with teacher_hidden and "
                             "teacher_weight; with teacher_logits or teacher_topk apply it to "
                             "the logits you pass")
    if teacher_topk is not None:
        return
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
    if hidden_form:
        check_weight("teacher_weight", teacher_weight, "teacher_hidden", teacher_hidden)
        check_bias("teacher_bias", teacher_bias, teacher_weight)
    teacher_vocab = teacher_weight.shape[0] if hidden_form else teacher_logits.shape[-1]
    check_vocabularies(student_weight.shape[0], teacher_vocab,
                       "teacher_weight" if hidden_form else "teacher_logits",
                       options["divergence"], options["beta"], options["alpha"])


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
    if torch.compiler.is_compiling():  # the range check below needs the values
        return labels
    kept = labels[labels != ignore_index]
    if kept.numel():
        low, high = int(kept.min()), int(kept.max())
        if low < 0 or high >= vocab:
            raise ValueError(f"labels must be token ids in [0, {vocab - 1}] or ignore_index "
                             f"({ignore_index}), got values in [{low}, {high}]")
    return labels


def flat(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.reshape(-1, x.shape[-1])


def check_num_items(num_items) -> int | torch.Tensor | None:
    """An int >= 1, or a 0-d integer tensor (Hugging Face's ``num_items_in_batch``; its
    value is checked where it is read, so that torch.compile traces it)."""
    if num_items is None:
        return None
    if not isinstance(num_items, torch.Tensor):
        return _checks.check_int("num_items", num_items)
    if num_items.dim() != 0 or num_items.dtype.is_floating_point or num_items.is_complex() \
            or num_items.dtype == torch.bool:
        raise TypeError(f"num_items must be an int or a 0-d integer tensor, got a "
                        f"{num_items.dtype} tensor of shape {tuple(num_items.shape)}")
    if not torch.compiler.is_compiling() and int(num_items) < 1:
        raise ValueError(f"num_items must be an int >= 1, got {int(num_items)}")
    return num_items


def fused_linear_kd_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                         teacher_hidden: torch.Tensor | None = None,
                         teacher_weight: torch.Tensor | None = None, *,
                         teacher_logits: torch.Tensor | None = None,
                         teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
                         student_bias: torch.Tensor | None = None,
                         teacher_bias: torch.Tensor | None = None,
                         labels: torch.Tensor | None = None, divergence: str = "forward",
                         beta: float = 0.5, alpha: float = 0.1, temperature: float = 1.0,
                         soft_weight: float = 1.0, hard_weight: float = 0.0,
                         ignore_index: int = -100, num_items: int | torch.Tensor | None = None,
                         reduction: str = "mean", chunk_size: int | None = None,
                         topk_tail: str = "renormalize", logit_scale: float = 1.0,
                         softcap: float | None = None, teacher_logit_scale: float = 1.0,
                         teacher_softcap: float | None = None,
                         scale_by_temperature_squared: bool = True,
                         backend: str | None = None) -> torch.Tensor:
    r"""Knowledge distillation of a language model's logits, its lm_head fused in.

    Student logits :math:`s = c\tanh(\sigma (h W^\top + b) / c)` (``logit_scale`` σ,
    ``softcap`` c; :math:`\sigma (h W^\top + b)` without a cap); the teacher as its hidden
    states and lm_head (the same with its own σ_t, c_t), its logits, or its top-k logits;
    per kept token (``labels != ignore_index``; every token without labels)

    .. math::
        \ell_n = w_{soft}\, T^2\, D(p_t, p_s) + w_{hard}\, \mathrm{CE}(s_n, y_n),\quad
        p = \operatorname{softmax}(z / T)

    D: forward KL(p_t‖p_s) (default), reverse KL(p_s‖p_t), the generalised JSD(β), skew KL
    KL(p_t‖α p_t + (1−α) p_s), skew reverse KL KL(p_s‖α p_s + (1−α) p_t) (DistiLLM) or total
    variation ½Σ|p_t − p_s|. The math of every option: docs/llm_distillation.md and
    :mod:`kdfast.reference.fused_linear_kd`.

    The native backend loops over chunks of kept tokens and never holds the (N, V) logits:
    per chunk the logits GEMMs in fp32 (fp64 for fp64), the loss and dL/dlogits, then
    dL/dhidden and the accumulated dL/dW, dL/db (fp32), so the backward only scales them by
    grad_output (``reduction="none"`` reruns the sweep with it). Forward KL, reverse KL and
    the JSD take dL/dlogits from one fused pass of the ``"softmax_kl"`` kernel (native C++ on
    the CPU); the skew KLs and total variation, which that kernel lacks, from a torch formula
    on the chunk's logits (log-softmaxes and an explicit gradient; still one chunk at a time).
    The sweep is one custom operator with a fake, so ``torch.compile(fullgraph=True)``
    traces it (the data-dependent checks of labels and top-k ids are skipped there).

    Args:
        student_hidden: (N, H) or (B, T, H) final hidden states of the student.
        student_weight: (V_s, H) its lm_head weight (may be tied to the embedding).
        teacher_hidden, teacher_weight: the teacher's hidden states (same tokens, its own H)
            and lm_head weight (V_t, H_t); or instead
        teacher_logits: (N, V_t) or (B, T, V_t) precomputed teacher logits; or instead
        teacher_topk: ``(values, indices)`` (N, k) or (B, T, k): the teacher's k largest
            logits per token and their ids (distinct, < V_s), e.g. ``logits.topk(k)``;
            for ``topk_tail="bucket"`` the values must be log-probabilities
            (``log_softmax`` at temperature 1). The temperature is applied inside.
        student_bias, teacher_bias: optional (V,) lm_head biases.
        labels: optional token ids, one per token; ``ignore_index`` marks excluded tokens.
            Needed for ``hard_weight > 0``.
        divergence: ``"forward"`` | ``"reverse"`` | ``"jsd"`` (``beta`` in [0, 1]) |
            ``"skew_forward"`` | ``"skew_reverse"`` (``alpha`` in [0, 1), 0 = plain KL) |
            ``"tv"``.
        temperature: T > 0, the KD temperature (not a sampling temperature).
        scale_by_temperature_squared: multiply the soft term by T² (default True, Hinton
            et al.'s factor, as kdfast's other logit losses; it keeps the soft gradients'
            size independent of T). False drops it, as Liger-Kernel's fused-linear
            distillation losses and TRL's GKD do (their logits / T, no T²).
        soft_weight, hard_weight: >= 0, the weights of the KD and cross-entropy terms.
        num_items: the global number of kept tokens for ``reduction="mean"`` (gradient
            accumulation, data parallel ranks), an int or a 0-d integer tensor (Hugging
            Face's ``num_items_in_batch``), else the local kept count.
        reduction: ``"mean"`` over kept tokens | ``"sum"`` | ``"none"`` (per token, the hidden
            states' leading shape, 0 at ignored tokens). Every token ignored gives 0.
        chunk_size: tokens per chunk (default from V and a 128 MiB budget, at least 256).
        topk_tail: ``"renormalize"`` (both distributions restricted to the k ids and
            renormalised there: only the student's logits at the k ids are compared and get
            a gradient) or ``"bucket"`` (k + 1 classes: the k ids and one bucket holding the
            teacher's tail mass 1 − Σ exp(values) against the student's mass outside them).
        logit_scale, softcap: the student's logit multiplier and Gemma-style cap
            (``softcap · tanh(logits / softcap)``, after the scale); gradients flow through.
        teacher_logit_scale, teacher_softcap: the same for a hidden-state teacher (its own;
            logits and top-k teachers are used as given).
        backend: ``None``/``"auto"``/``"native"`` (chunked) or ``"reference"`` (eager).

    Vocabularies: a full teacher with V_t ≠ V_s is compared over max(V_s, V_t) classes, the
    shorter side padded with −inf (probability 0). Where that makes the loss +inf for every
    token (the student lacking ids with forward KL / skew_forward α = 0 / jsd β = 0; the
    teacher lacking ids with reverse KL / skew_reverse α = 0 / jsd β = 1) it raises instead.

    The teacher is frozen: its tensors are detached and no gradient is ever computed for
    them, even when they require grad (their ``.grad`` stays None).

    Not yet offered: a Triton sweep.

    Example:
        >>> loss = kdfast.functional.fused_linear_kd_loss(  # doctest: +SKIP
        ...     out.hidden_states[-1], model.lm_head.weight, labels=labels,
        ...     teacher_logits=teacher_out.logits.detach())
    """
    settings = {"divergence": divergence, "beta": beta, "alpha": alpha,
                "temperature": temperature, "soft_weight": soft_weight,
                "hard_weight": hard_weight, "ignore_index": ignore_index,
                "reduction": reduction, "chunk_size": chunk_size, "topk_tail": topk_tail,
                "logit_scale": logit_scale, "softcap": softcap,
                "teacher_logit_scale": teacher_logit_scale, "teacher_softcap": teacher_softcap,
                "scale_by_temperature_squared": scale_by_temperature_squared}
    check_fused_linear_kd_options(**settings)
    num_items = check_num_items(num_items)
    _checks.check_tensor("student_hidden", student_hidden, (2, 3), HIDDEN_LAYOUT)
    check_weight("student_weight", student_weight, "student_hidden", student_hidden)
    check_bias("student_bias", student_bias, student_weight)
    check_teacher(student_hidden, student_weight, teacher_hidden, teacher_weight,
                  teacher_logits, teacher_topk, teacher_bias, settings)
    num_tokens, vocab = student_hidden.shape[:-1].numel(), student_weight.shape[0]
    values = indices = None
    if teacher_topk is not None:
        values, indices = check_topk(teacher_topk, num_tokens, vocab, topk_tail,
                                     student_hidden.device)
    if labels is not None:
        labels = check_token_labels(labels, num_tokens, vocab, ignore_index,
                                    student_hidden.device)
    elif hard_weight > 0:
        raise ValueError("hard_weight > 0 needs labels (the token ids of the cross-entropy "
                         "term); pass labels= or set hard_weight=0")
    tensors = [student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
               teacher_bias, teacher_logits, values]
    present = _checks.promote(*(x for x in tensors if x is not None))
    found = iter(present)
    tensors = [None if x is None else next(found) for x in tensors]
    hidden, weight, bias, t_hidden, t_weight, t_bias, t_logits, values = tensors
    options = FusedLinearKDOptions(
        divergence, float(beta), float(alpha), float(temperature), float(soft_weight),
        float(hard_weight), int(ignore_index), num_items if isinstance(num_items, int) else None,
        reduction, chunk_size, topk_tail, float(logit_scale),
        None if softcap is None else float(softcap), float(teacher_logit_scale),
        None if teacher_softcap is None else float(teacher_softcap),
        scale_by_temperature_squared)
    impl = backends.choose(CORE, backend, hidden, weight)
    loss = impl.fn((flat(hidden), weight, bias),
                   (flat(t_hidden), t_weight, t_bias, flat(t_logits), values, indices), labels,
                   num_items if isinstance(num_items, torch.Tensor) else None, options)
    return loss.reshape(student_hidden.shape[:-1]) if reduction == "none" else loss


class FusedLinearKDLoss(FunctionalLoss):
    """Module form of :func:`kdfast.functional.fused_linear_kd_loss`;
    ``forward(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, *,
    teacher_logits=None, teacher_topk=None, student_bias=None, teacher_bias=None,
    labels=None, num_items=None)``.

    Example:
        >>> criterion = kdfast.FusedLinearKDLoss(temperature=2.0, hard_weight=0.5)
        >>> loss = criterion(h, model.lm_head.weight, labels=labels,  # doctest: +SKIP
        ...                  teacher_logits=teacher_logits)
    """

    function = staticmethod(fused_linear_kd_loss)
    validate = staticmethod(check_fused_linear_kd_options)

    def __init__(self, divergence: str = "forward", beta: float = 0.5, alpha: float = 0.1,
                 temperature: float = 1.0, soft_weight: float = 1.0, hard_weight: float = 0.0,
                 ignore_index: int = -100, reduction: str = "mean",
                 chunk_size: int | None = None, topk_tail: str = "renormalize",
                 logit_scale: float = 1.0, softcap: float | None = None,
                 teacher_logit_scale: float = 1.0, teacher_softcap: float | None = None,
                 scale_by_temperature_squared: bool = True,
                 backend: str | None = None) -> None:
        super().__init__(divergence=divergence, beta=beta, alpha=alpha,
                         temperature=temperature, soft_weight=soft_weight,
                         hard_weight=hard_weight, ignore_index=ignore_index,
                         reduction=reduction, chunk_size=chunk_size, topk_tail=topk_tail,
                         logit_scale=logit_scale, softcap=softcap,
                         teacher_logit_scale=teacher_logit_scale,
                         teacher_softcap=teacher_softcap,
                         scale_by_temperature_squared=scale_by_temperature_squared,
                         backend=backend)

    def forward(self, student_hidden, student_weight, teacher_hidden=None,
                teacher_weight=None, *, teacher_logits=None, teacher_topk=None,
                student_bias=None, teacher_bias=None, labels=None, num_items=None):
        return fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden,
                                    teacher_weight, teacher_logits=teacher_logits,
                                    teacher_topk=teacher_topk, student_bias=student_bias,
                                    teacher_bias=teacher_bias, labels=labels,
                                    num_items=num_items, **self._option_values())
