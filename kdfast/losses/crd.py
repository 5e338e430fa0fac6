"""Contrastive representation distillation: ``crd_loss`` and ``CRDLoss`` with its embedding
heads and momentum memory bank (Tian et al., "Contrastive Representation Distillation",
ICLR 2020)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdfast import _checks, backends
from kdfast.losses._module import FunctionalLoss
from kdfast.ops.crd import CORE
from kdfast.reference.crd import estimate_normalizer

EMBEDDING = "(B, feat_dim)"
BANK_ROWS = "(B, K + 1, feat_dim)"


def check_n_data(n_data) -> int:
    if isinstance(n_data, bool) or not isinstance(n_data, int):
        raise TypeError(f"n_data must be an int (the number of training samples), got "
                        f"{type(n_data).__name__}")
    if n_data < 1:
        raise ValueError(f"n_data must be >= 1 (the number of training samples), got {n_data}")
    return n_data


def check_normalizers(normalizers) -> None:
    if normalizers is None:
        return
    if not isinstance(normalizers, Sequence) or len(normalizers) != 2:
        raise TypeError("normalizers must be None (estimate Z from this batch) or a pair "
                        f"(z_student, z_teacher) of numbers, got {normalizers!r}")
    for i, value in enumerate(normalizers):
        _checks.check_positive(f"normalizers[{i}]", value)


def check_crd_options(temperature: float = 0.07, normalizers=None,
                      reduction: str = "mean") -> None:
    _checks.check_positive("temperature", temperature)
    check_normalizers(normalizers)
    _checks.check_choice("reduction", reduction, _checks.REDUCTIONS)


def crd_loss(student: torch.Tensor, teacher: torch.Tensor, student_bank: torch.Tensor,
             teacher_bank: torch.Tensor, n_data: int, *, temperature: float = 0.07,
             normalizers: tuple[float, float] | None = None, reduction: str = "mean",
             backend: str | None = None) -> torch.Tensor:
    r"""CRD's NCE loss (Tian et al., 2020) for given memory-bank rows (stateless).

    For anchor :math:`v` and bank rows :math:`m_0` (positive) and :math:`m_1..m_K`,
    :math:`P_k = \exp(\langle m_k, v\rangle / T) / Z` and, with noise :math:`\nu = K / N`
    (N = ``n_data``, ε = 1e-7),

    .. math::
        h(P) = -\log\frac{P_0}{P_0 + \nu + \epsilon}
               - \sum_{k=1}^{K} \log\frac{\nu}{P_k + \nu + \epsilon},\qquad
        \ell_b = h(P^{s \to t\text{-bank}}) + h(P^{t \to s\text{-bank}}).

    The student's embedding is scored against ``teacher_bank`` (normalised by
    ``normalizers[0]``) and the teacher's against ``student_bank`` (``normalizers[1]``), as
    RepDistiller's ``ContrastMemory`` + two ``ContrastLoss``. ``reduction="mean"`` is their
    value (sum / batch size). :class:`kdfast.CRDLoss` holds the heads, the banks and Z and
    calls this; use this function directly to bring your own banks.

    Args:
        student: (B, feat_dim) student embeddings (l2-normalised, e.g. by
            :class:`kdfast.EmbeddingHead`).
        teacher: (B, feat_dim) teacher embeddings.
        student_bank: (B, K + 1, feat_dim) rows of the student's memory bank for each sample,
            its own row first (the positive), then K negatives.
        teacher_bank: (B, K + 1, feat_dim) the same rows of the teacher's bank.
        n_data: the number of training samples (rows of each bank): the noise distribution is
            uniform over them.
        temperature: T, default 0.07 (RepDistiller's ``nce_t``).
        normalizers: (Z_student, Z_teacher), positive; default None estimates them from this
            batch (n_data x the mean exp score, detached), which is what RepDistiller does
            on its first batch and then keeps.
        reduction: ``"mean"`` (default) | ``"sum"`` over the batch, ``"none"`` for (B,).
        backend: ``None``/``"auto"``/``"reference"`` (no fused core).

    Example:
        >>> s = torch.nn.functional.normalize(torch.randn(8, 128), dim=1)
        >>> t = torch.nn.functional.normalize(torch.randn(8, 128), dim=1)
        >>> bank_s, bank_t = torch.randn(8, 17, 128), torch.randn(8, 17, 128)
        >>> kdfast.functional.crd_loss(s, t, bank_s, bank_t, n_data=1000)  # doctest: +SKIP
    """
    check_crd_options(temperature, normalizers, reduction)
    check_n_data(n_data)
    _checks.check_tensor("student", student, 2, EMBEDDING)
    _checks.check_tensor("teacher", teacher, 2, EMBEDDING)
    _checks.check_tensor("student_bank", student_bank, 3, BANK_ROWS)
    _checks.check_tensor("teacher_bank", teacher_bank, 3, BANK_ROWS)
    fix = "embed both to one feat_dim (kdfast.EmbeddingHead, or kdfast.CRDLoss which has them)"
    _checks.check_same_shape(student, teacher, fix=fix)
    for name, bank in (("student_bank", student_bank), ("teacher_bank", teacher_bank)):
        _checks.check_same_batch(student, bank, ("student", name))
        if bank.shape[2] != student.shape[1] or bank.shape[1] < 2:
            raise ValueError(f"{name} must be (B, K + 1, feat_dim) = (B, K + 1, "
                             f"{student.shape[1]}) with K >= 1, got {tuple(bank.shape)}")
    if student_bank.shape != teacher_bank.shape:
        raise ValueError(f"student_bank and teacher_bank must have the same shape, got "
                         f"{tuple(student_bank.shape)} and {tuple(teacher_bank.shape)}")
    student, teacher, student_bank, teacher_bank = _checks.promote(
        student, teacher, student_bank, teacher_bank)
    temperature = float(temperature)
    if normalizers is None:
        normalizers = (estimate_normalizer(student, teacher_bank, temperature, n_data),
                       estimate_normalizer(teacher, student_bank, temperature, n_data))
    else:
        normalizers = tuple(float(z) for z in normalizers)
    core = backends.choose(CORE, backend, student, teacher, student_bank, teacher_bank).fn
    per_sample = core(student, teacher, student_bank, teacher_bank, n_data, temperature,
                      *normalizers)
    return _checks.reduce(per_sample, reduction)


class EmbeddingHead(nn.Module):
    """CRD's embedding head: flatten, linear to ``out_features`` (default 128, RepDistiller's
    ``feat_dim``), l2-normalise. Example: ``kdfast.EmbeddingHead(512)(torch.randn(8, 512))``."""

    def __init__(self, in_features: int, out_features: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


def _check_index(name: str, index, shape: tuple[int, ...], n_data: int,
                 device: torch.device) -> torch.Tensor:
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of dataset indices, got "
                        f"{type(index).__name__}")
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer dataset indices, got dtype {index.dtype}")
    if tuple(index.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(index.shape)}")
    if index.device != device:
        raise ValueError(f"{name} is on {index.device} but the memory bank is on {device}; "
                         f"move it with {name}.to(device)")
    if index.numel() and not torch.compiler.is_compiling():
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= n_data:
            raise ValueError(f"{name} must be dataset indices in [0, {n_data - 1}] "
                             f"(n_data={n_data}), got values in [{low}, {high}]")
    return index.long()


class CRDLoss(FunctionalLoss):
    """CRD with its state: two embedding heads, two momentum memory banks and Z.

    ``forward(student_feat, teacher_feat, index, contrast_index=None)`` as RepDistiller's
    ``CRDLoss``: embeds both features (:class:`EmbeddingHead`), gathers the bank rows at
    ``contrast_index`` (B, K + 1) — the sample's ``index`` first, then K negatives; when None,
    K = ``nce_k`` negatives are drawn uniformly from the n_data rows (RepDistiller's
    AliasMethod over uniform weights) with this loss's own seeded generator — computes
    :func:`kdfast.functional.crd_loss`, and then, in training mode, moves each bank's rows at
    ``index`` towards the new embeddings: m <- normalise(momentum · m + (1 − momentum) · v).

    State, all in buffers (so ``state_dict`` checkpoints and resumes it exactly):
    ``student_memory`` and ``teacher_memory`` (n_data, feat_dim), initialised uniform in
    ±1/sqrt(feat_dim / 3) as RepDistiller; ``normalizers`` (Z_student, Z_teacher), −1 until
    the first batch sets them (RepDistiller's ``params[2:4]``); ``sampler_state``, the
    generator's state.

    Args:
        student_dim, teacher_dim: flattened sizes of the student's and teacher's features.
        n_data: the number of training samples (the dataset must return each sample's index
            in [0, n_data) to pass as ``index``; RepDistiller's ``CIFAR100InstanceSample``).
        feat_dim: embedding size, default 128. nce_k: negatives per sample, default 16384.
        temperature: default 0.07 (``nce_t``). momentum: of the bank update, default 0.5
            (``nce_m``).
        seed: seeds the generator of the bank initialisation and of the negatives (default
            None: drawn from torch's global generator, so ``torch.manual_seed`` fixes it).
        reduction: default ``"mean"``. backend: default None.

    Train ``loss.parameters()`` (the heads) with the student. Negatives are drawn on the CPU
    and moved to the bank's device (B · (K + 1) indices per step).

    Example:
        >>> crd = kdfast.CRDLoss(512, 2048, n_data=50000, nce_k=4096, seed=0)
        >>> index = torch.randint(0, 50000, (8,))
        >>> crd(torch.randn(8, 512), torch.randn(8, 2048), index)  # doctest: +SKIP
    """

    function = staticmethod(crd_loss)

    def __init__(self, student_dim: int, teacher_dim: int, n_data: int, *, feat_dim: int = 128,
                 nce_k: int = 16384, temperature: float = 0.07, momentum: float = 0.5,
                 seed: int | None = None, reduction: str = "mean",
                 backend: str | None = None) -> None:
        super().__init__(temperature=temperature, momentum=momentum, reduction=reduction,
                         backend=backend)
        for name, value in (("student_dim", student_dim), ("teacher_dim", teacher_dim),
                            ("feat_dim", feat_dim), ("nce_k", nce_k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.n_data, self.nce_k = check_n_data(n_data), nce_k
        self.embed_student = EmbeddingHead(student_dim, feat_dim)
        self.embed_teacher = EmbeddingHead(teacher_dim, feat_dim)
        generator = torch.Generator()
        generator.manual_seed(int(torch.randint(2**62, ())) if seed is None else seed)
        bound = 1.0 / math.sqrt(feat_dim / 3)
        for name in ("student_memory", "teacher_memory"):
            memory = torch.rand(n_data, feat_dim, generator=generator) * (2 * bound) - bound
            self.register_buffer(name, memory)
        self.register_buffer("normalizers", torch.full((2,), -1.0))
        self.register_buffer("sampler_state", generator.get_state())

    def _check_options(self, options: dict) -> None:
        _checks.check_backend(options.get("backend"))
        check_crd_options(options["temperature"], None, options["reduction"])
        momentum = _checks.check_positive("momentum", options["momentum"], inclusive=True)
        if momentum >= 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")

    def sample_contrast_index(self, index: torch.Tensor) -> torch.Tensor:
        """(B, nce_k + 1) bank rows: ``index`` first, then uniform negatives (seeded)."""
        generator = torch.Generator()
        generator.set_state(self.sampler_state.cpu())
        drawn = torch.randint(self.n_data, (index.shape[0], self.nce_k + 1),
                              generator=generator)
        self.sampler_state.copy_(generator.get_state())
        drawn = drawn.to(index.device)
        drawn[:, 0] = index
        return drawn

    @torch.no_grad()
    def _update_memory(self, memory: torch.Tensor, index: torch.Tensor,
                       embedding: torch.Tensor) -> None:
        momentum = float(self.momentum)
        moved = memory[index] * momentum + embedding.to(memory.dtype) * (1 - momentum)
        memory.index_copy_(0, index, F.normalize(moved, dim=1))

    def forward(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor,
                index: torch.Tensor, contrast_index: torch.Tensor | None = None
                ) -> torch.Tensor:
        _checks.check_tensor("student_feat", student_feat, (2, 3, 4, 5), "(B, ...)")
        _checks.check_tensor("teacher_feat", teacher_feat, (2, 3, 4, 5), "(B, ...)")
        _checks.check_same_batch(student_feat, teacher_feat, ("student_feat", "teacher_feat"))
        batch, device = student_feat.shape[0], self.student_memory.device
        index = _check_index("index", index, (batch,), self.n_data, device)
        if contrast_index is None:
            contrast_index = self.sample_contrast_index(index)
        else:
            if contrast_index.dim() != 2 or contrast_index.shape[1] < 2:
                raise ValueError("contrast_index must be (B, K + 1) with K >= 1: the sample's "
                                 "own index first, then its negatives; got shape "
                                 f"{tuple(contrast_index.shape)}")
            contrast_index = _check_index("contrast_index", contrast_index,
                                          (batch, contrast_index.shape[1]), self.n_data,
                                          device)
        student = self.embed_student(student_feat)
        teacher = self.embed_teacher(teacher_feat)
        student_bank = self.student_memory[contrast_index]
        teacher_bank = self.teacher_memory[contrast_index]
        temperature = float(self.temperature)
        if bool((self.normalizers < 0).any()):
            estimates = (estimate_normalizer(student, teacher_bank, temperature, self.n_data),
                         estimate_normalizer(teacher, student_bank, temperature, self.n_data))
            self.normalizers.copy_(torch.stack(estimates).to(self.normalizers))
        loss = crd_loss(student, teacher, student_bank, teacher_bank, self.n_data,
                        temperature=temperature, normalizers=tuple(self.normalizers.tolist()),
                        reduction=self.reduction, backend=self.backend)
        if self.training:
            self._update_memory(self.student_memory, index, student.detach())
            self._update_memory(self.teacher_memory, index, teacher.detach())
        return loss
