"""The benchmarked cores, one declarative entry each.

A :class:`Core` names the public function (looked up in :mod:`kdfast.functional` at call time,
so a loss that lands later is picked up), its options, the registry core whose backends are
benchmarked (:func:`kdfast.backends.implementations`), the naive B·C·C·HW formulation where
public KD code has one, how to build inputs and the floor (:mod:`kdfast.bench.floors`).

To add a core: append a ``Core(...)`` to ``CORES``; nothing else in the harness changes.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from kdfast import functional
from kdfast.bench import floors
from kdfast.bench.shapes import (
    EmbeddingShape,
    FeatureShape,
    LmHeadShape,
    LogitShape,
    MapShape,
    Shape,
)
from kdfast.ops import attention, fused_linear_kd, gram, mmd, softmax_kl

Tensors = tuple[torch.Tensor, ...]


class Call(NamedTuple):
    """What a ``pack`` returns where the public function takes keyword-only tensors (a plain
    tuple is the positional arguments alone)."""
    args: tuple
    keywords: dict


def _randn(shape, dtype, device, seed, requires_grad):
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(*shape, dtype=dtype, device=device, generator=generator)
    return x.requires_grad_(requires_grad)


def feature_inputs(shape: FeatureShape, dtype, device) -> tuple[Tensors, Tensors]:
    """Student (B, C_s, H, W) with grad, teacher (B, C_t, H, W) without."""
    b, h, w = shape.batch, shape.height, shape.width
    return ((_randn((b, shape.s_channels, h, w), dtype, device, 1, True),),
            (_randn((b, shape.t_channels, h, w), dtype, device, 2, False),))


def pair_inputs(shape: FeatureShape, dtype, device) -> tuple[Tensors, Tensors]:
    """FSP: layers a (C_s channels) and b (C_t channels) for student (grad) and teacher."""
    b, h, w = shape.batch, shape.height, shape.width
    sizes = ((b, shape.s_channels, h, w), (b, shape.t_channels, h, w))
    return (tuple(_randn(s, dtype, device, 1 + i, True) for i, s in enumerate(sizes)),
            tuple(_randn(s, dtype, device, 3 + i, False) for i, s in enumerate(sizes)))


def logit_inputs(shape: LogitShape, dtype, device) -> tuple[Tensors, Tensors]:
    size = (shape.batch, shape.classes)
    return (_randn(size, dtype, device, 1, True),), (_randn(size, dtype, device, 2, False),)


def map_inputs(shape: MapShape, dtype, device) -> tuple[Tensors, Tensors]:
    """Student (B, classes, H, W) logit maps with grad, teacher's of the same shape without."""
    size = (shape.batch, shape.channels, shape.height, shape.width)
    return (_randn(size, dtype, device, 1, True),), (_randn(size, dtype, device, 2, False),)


def lm_head_inputs(shape: LmHeadShape, dtype, device) -> tuple[Tensors, Tensors]:
    """Student hidden (N, H) and lm_head weight (V, H) with grad, the teacher's hidden (N, H)
    and lm_head weight (V, H) without (an online teacher: the form Liger-Kernel's
    fused-linear losses take, so that they can run the same inputs); the weights scaled by
    1/sqrt(H) so that the logits are O(1)."""
    n, h, v = shape.tokens, shape.hidden, shape.vocab
    weight = _randn((v, h), dtype, device, 2, False) * h ** -0.5
    teacher_weight = _randn((v, h), dtype, device, 4, False) * h ** -0.5
    return ((_randn((n, h), dtype, device, 1, True), weight.requires_grad_()),
            (_randn((n, h), dtype, device, 3, False), teacher_weight))


def embedding_inputs(shape: EmbeddingShape, dtype, device) -> tuple[Tensors, Tensors]:
    return ((_randn((shape.batch, shape.s_dim), dtype, device, 1, True),),
            (_randn((shape.batch, shape.t_dim), dtype, device, 2, False),))


def as_pairs(students: Tensors, teachers: Tensors) -> tuple:
    """FSP's public signature: two lists of (layer a, layer b) pairs."""
    return [tuple(students)], [tuple(teachers)]


def flat(students: Tensors, teachers: Tensors) -> tuple:
    return (*students, *teachers)


def with_targets(students: Tensors, teachers: Tensors) -> tuple:
    """DKD's public signature: the logits and (B,) class indices, made here (cycling through
    the classes, B int64s) so that the float inputs alone reach the backends' ``supports``."""
    student = students[0]
    targets = torch.arange(student.shape[0], device=student.device) % student.shape[1]
    return (*students, *teachers, targets)


def naive_broadcast_bytes(students: Tensors, teachers: Tensors) -> float:
    """The naive formulation's largest tensor, B·C·C·HW (C the most channels of any input),
    times 6: what must fit before the naive provider is run. Measured on CPU (cifar suite):
    NST-rbf's forward+backward peaks at 5 such tensors, FSP's at 3, forwards at 1-2."""
    first = students[0]
    channels = max(x.shape[1] for x in (*students, *teachers))
    return 6.0 * first.shape[0] * channels ** 2 * first[0, 0].numel() * first.element_size()


IGNORE_INDEX = -100


def token_labels(hidden: torch.Tensor, vocab: int) -> torch.Tensor:
    """(N,) labels cycling through the vocabulary, every fourth token ignored."""
    tokens = torch.arange(hidden.shape[0], device=hidden.device)
    return (tokens % vocab).masked_fill(tokens % 4 == 3, IGNORE_INDEX)


def with_labels(students: Tensors, teachers: Tensors) -> Call:
    """fused_linear_kd_loss's signature: hidden, weight, the teacher's hidden and weight and
    (N,) labels (:func:`token_labels`), made here so that the float inputs alone reach the
    backends' ``supports``."""
    hidden, weight = students
    return Call((hidden, weight, *teachers), {"labels": token_labels(hidden, weight.shape[0])})


# (N, V) fp32 tensors alive at the peak of fwd+bwd: eager (reference / compile) and in one
# Liger-Kernel chunk (its chunk_size 1024, torch.chunk into N // 1024 pieces), measured on the
# CPU at 1024x512x32000 (docs/llm_distillation.md), rounded up.
EAGER_LOGIT_TENSORS = 8
LIGER_LOGIT_TENSORS = 8
LIGER_CHUNK = 1024


def lm_head_provider_bytes(provider: str, students: Tensors, teachers: Tensors) -> float:
    """What the eager and Liger-Kernel providers hold of (rows, V) logits at the peak; 0 for
    kdfast's chunked backends (a bounded chunk)."""
    hidden, weight = students
    tokens, row_bytes = hidden.shape[0], weight.shape[0] * max(4, weight.element_size())
    if provider == "reference" or provider.startswith("compile"):
        return EAGER_LOGIT_TENSORS * tokens * row_bytes
    if provider == "liger":
        rows = -(-tokens // max(1, tokens // LIGER_CHUNK))
        return LIGER_LOGIT_TENSORS * rows * row_bytes
    return 0.0


@dataclass(frozen=True)
class Core:
    name: str                          # CLI name
    function: str                      # public function in kdfast.functional
    make_inputs: Callable[..., tuple[Tensors, Tensors]]
    floor: Callable[[Shape, int], dict[str, floors.Floor]]
    kind: str = "features"             # which shapes of a suite it takes
    options: Mapping = field(default_factory=dict)
    pack: Callable[[Tensors, Tensors], tuple | Call] = flat
    registry: str | None = None        # backends.implementations(registry) are benchmarked
    naive: str | None = None           # "module:function" of the naive formulation
    naive_options: Mapping = field(default_factory=dict)
    # (provider, students, teachers) -> which code that provider runs on these inputs where it
    # is not the provider's own kernel ("" otherwise); written into the row's note.
    code_note: Callable[[str, Tensors, Tensors], str] | None = None
    # Other libraries' implementations, optional providers: name -> "module:function" of a
    # ``build(core, students, teachers) -> fn(students, teachers) -> loss`` that raises
    # ImportError where the library is not installed (:mod:`kdfast.bench.peers`).
    peers: Mapping[str, str] = field(default_factory=dict)
    # (provider, students, teachers) -> bytes that provider needs beyond the inputs, where
    # some would not fit (the eager (N, V) logits): checked before it runs.
    provider_bytes: Callable[[str, Tensors, Tensors], float] | None = None

    def loss(self, students: Tensors, teachers: Tensors, backend: str) -> torch.Tensor:
        """The public loss (mean reduction) on these inputs with ``backend``."""
        function = getattr(functional, self.function)
        packed = self.pack(students, teachers)
        args, keywords = packed if isinstance(packed, Call) else (packed, {})
        return function(*args, **keywords, **self.options, backend=backend)

    def naive_function(self) -> Callable | None:
        """The naive formulation, or None where it does not exist (yet)."""
        if self.naive is None:
            return None
        module, name = self.naive.split(":")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            return None

    def naive_loss(self, function: Callable, students: Tensors, teachers: Tensors):
        return function(*students, *teachers, **self.naive_options).mean()


def _nst_code_note(options: Mapping) -> Callable[[str, Tensors, Tensors], str]:
    """Native CUDA and Triton have no kernel for the feature-Gram path of channel MMD
    (poly d = 2 on small maps): their rows there time feature_gram_channel_mmd."""
    def note(provider: str, students: Tensors, teachers: Tensors) -> str:
        from kdfast.ops.mmd import FEATURE_GRAM, channel_mmd_path

        student, teacher = students[0], teachers[0]
        path = channel_mmd_path(student, teacher, options["kernel"], options.get("degree", 2),
                                options.get("teacher_term", True))
        if path == FEATURE_GRAM and (provider == "triton" or (
                provider == "native" and student.device.type == "cuda")):
            return "ran feature_gram_channel_mmd (torch matmuls; no kernel for this path)"
        return ""
    return note


def _nst(kernel: str, floor) -> Core:
    options = {"kernel": kernel, **({"sigma2": 1.0} if kernel == "rbf" else {})}
    return Core(f"nst-{kernel}", "nst_loss", feature_inputs, floor, options=options,
                registry=mmd.CORE, naive="kdfast.reference.nst:naive_channel_mmd",
                naive_options={"kernel": kernel}, code_note=_nst_code_note(options))


CORES: dict[str, Core] = {core.name: core for core in (
    Core("at", "at_loss", feature_inputs, floors.attention, options={"p": 2},
         registry=attention.CORE),
    _nst("rbf", floors.mmd_gram),
    _nst("poly", floors.mmd_poly),
    _nst("linear", floors.mmd_linear),
    Core("sp", "sp_loss", feature_inputs, floors.similarity, registry=gram.SIMILARITY),
    Core("fsp", "fsp_loss", pair_inputs, floors.fsp, pack=as_pairs, registry=gram.FSP,
         naive="kdfast.reference.fsp:naive_fsp_pair_loss"),
    Core("kd", "kd_loss", logit_inputs, floors.logit_kd, kind="logits",
         options={"temperature": 4.0}, registry="softmax_kl"),
    Core("rkd", "rkd_loss", embedding_inputs, floors.relational, kind="embeddings"),
    Core("dkd", "dkd_loss", logit_inputs, floors.logit_kd, kind="logits",
         options={"temperature": 4.0}, pack=with_targets, registry="softmax_kl"),
    Core("cwd", "cwd_loss", map_inputs, floors.channel_softmax_kl, kind="maps",
         options={"temperature": 1.0}, registry=softmax_kl.CORE),
    Core("fused-linear-kd", "fused_linear_kd_loss", lm_head_inputs, floors.fused_linear,
         kind="lmhead", options={"temperature": 2.0}, pack=with_labels,
         registry=fused_linear_kd.CORE,
         peers={"liger": "kdfast.bench.peers:liger_fused_linear_jsd"},
         provider_bytes=lm_head_provider_bytes),
)}
