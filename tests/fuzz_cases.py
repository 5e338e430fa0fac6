"""Randomised cases of every public loss with a (present or future) fused core, and how a
backend is checked against the float64 reference on them.

One table, :data:`LOSSES`: per loss, the core it dispatches to, a hypothesis draw of its
shapes and options, and how its flat list of tensors becomes the loss's arguments.
:func:`fuzz_cases` adds what every case varies: layout per tensor (contiguous,
channels_last, a channel slice ``x[:, ::2]``, a transposed view, a batch-expanded view),
dtype, whether the teacher requires grad, ``reduction`` and a random ``grad_output``.
:func:`assert_case_matches_reference` runs a case through ``kdfast.functional`` with a
backend and with ``backend="reference"`` in float64 on the same values, and compares the
value and every input gradient (tests.helpers.assert_matches_reference). Used by
tests/test_fuzz.py (CPU) and tests/triton/test_fuzz.py.

Inputs are finite random values of one dtype per case (mixed dtypes, NaN and degenerate
inputs are tested elsewhere). ``KDFAST_FUZZ_EXAMPLES=N`` runs N random (not derandomised)
examples per test instead of the fixed CI ones.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from hypothesis import settings
from hypothesis import strategies as st

import kdfast
from kdfast import backends
from tests.helpers import REDUCTIONS, assert_matches_reference

FUSED_CORES = ("attention_map", "similarity", "fsp", "channel_mmd", "softmax_kl")

LAYOUTS = ("contiguous", "channels_last", "sliced", "transposed", "expanded")


def fuzz_settings(examples: int, **overrides) -> settings:
    """``examples`` fixed (derandomised) examples, or ``KDFAST_FUZZ_EXAMPLES`` random ones."""
    deeper = os.environ.get("KDFAST_FUZZ_EXAMPLES")
    return settings(max_examples=int(deeper) if deeper else examples, deadline=None,
                    derandomize=not deeper, database=None, **overrides)


@dataclass(frozen=True)
class FuzzCase:
    """One drawn case; its repr is enough to rebuild it in a regression test."""

    loss: str                              # a name in kdfast.functional (a key of LOSSES)
    shapes: tuple[tuple[int, ...], ...]    # every input tensor, in argument order
    layouts: tuple[str, ...]               # one of LAYOUTS per input
    requires_grad: tuple[bool, ...]        # per input
    dtype: torch.dtype
    options: dict = field(default_factory=dict)  # keyword options of the loss
    grad_output: float | None = None       # scalar reductions; None: a seeded vector
    seed: int = 0

    @property
    def core(self) -> str:
        return LOSSES[self.loss].core


# --- the inputs -------------------------------------------------------------------------

def laid_out(values: Callable[[tuple[int, ...]], torch.Tensor], shape: tuple[int, ...],
             layout: str) -> torch.Tensor:
    """A tensor of ``shape`` in ``layout``, its values from ``values(storage_shape)``: the
    layouts a user gets from ordinary code (``.to(memory_format=...)``, slicing, ``.mT``,
    ``.expand``)."""
    if layout == "contiguous":
        return values(shape)
    if layout == "channels_last":
        return values(shape).to(memory_format=torch.channels_last)
    if layout == "sliced":
        return values((shape[0], 2 * shape[1], *shape[2:]))[:, ::2]
    if layout == "transposed":
        return values((*shape[:-2], shape[-1], shape[-2])).transpose(-1, -2)
    if layout == "expanded":
        return values((1, *shape[1:])).expand(shape)
    raise ValueError(f"unknown layout {layout!r}")


def make_inputs(case: FuzzCase, device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """The case's inputs: fresh leaves in its dtype and layouts (seeded, never zeros)."""
    generator = torch.Generator().manual_seed(case.seed)

    def values(shape):
        return torch.randn(shape, dtype=torch.float64, generator=generator).to(device,
                                                                               case.dtype)
    return [laid_out(values, shape, layout).requires_grad_(grad)
            for shape, layout, grad in zip(case.shapes, case.layouts, case.requires_grad,
                                           strict=True)]


def grad_output_for(case: FuzzCase, value: torch.Tensor) -> torch.Tensor:
    """The case's grad_output for ``value``, exactly representable in the case's dtype."""
    if case.grad_output is not None:
        g = torch.full(value.shape, case.grad_output, dtype=torch.float64)
    else:
        generator = torch.Generator().manual_seed(case.seed + 1)
        g = torch.randn(value.shape, dtype=torch.float64, generator=generator)
    return g.to(case.dtype).to(value.device, value.dtype)


def output_names(case: FuzzCase) -> str:
    return " ".join(f"{layout}{shape}" for shape, layout in zip(case.shapes, case.layouts,
                                                                strict=True))


# --- the comparer -----------------------------------------------------------------------

def assert_case_matches_reference(case: FuzzCase, backend: str,
                                  device: str | torch.device = "cpu") -> None:
    """``case`` run through ``backend`` against ``backend="reference"`` in float64 on the same
    values, by :func:`tests.helpers.assert_matches_reference` (its one dtype rule; the
    case's grad_output; rounding noise allowed where ``LossCases.degenerate`` says the exact
    outputs are 0)."""
    loss = LOSSES[case.loss]

    def run(name):
        return lambda *inputs: loss.call(list(inputs), backend=name, **case.options)
    assert_matches_reference(run(backend), run("reference"), make_inputs(case, device),
                             grad_output=lambda value: grad_output_for(case, value),
                             degenerate=loss.degenerate(case),
                             value_atol=loss.value_noise(case),
                             what=f"{backend} {case.loss} {output_names(case)}")


def fuzzed_backends(case: FuzzCase, candidates: Sequence[str], required: Sequence[str],
                    device: str | torch.device = "cpu") -> list[str]:
    """The backends among ``candidates`` that are registered for the case's core and whose
    ``supports`` accepts its inputs; asserts that every one in ``required`` is among them
    (so a suite cannot silently compare the reference with itself)."""
    impls = backends.implementations(case.core)
    inputs = make_inputs(case, device)
    runnable = [name for name in candidates
                if name in impls and impls[name].supports(*inputs) is None]
    for name in required:
        reason = "not registered" if name not in impls else impls[name].supports(*inputs)
        assert name in runnable, f"backend {name!r} must run {case}, but: {reason}"
    return runnable


# --- the case table ---------------------------------------------------------------------

CHANNELS = st.sampled_from((*range(1, 10), 16, 33))
BATCH = st.integers(1, 4)
SIDE = st.integers(1, 9)


@st.composite
def channels(draw, minimum: int = 1) -> int:
    return draw(CHANNELS.filter(lambda c: c >= minimum))


@st.composite
def pooled_sizes(draw) -> tuple[tuple[int, int], tuple[int, int]]:
    """Two spatial sizes (H, W) in 1..9 that average-pool to each other: the smaller one,
    and the larger as whole multiples of it (equal half of the time), either side larger."""
    h, w = draw(SIDE), draw(SIDE)
    small = (h, w)
    if draw(st.booleans()):
        return small, small
    big = (h * draw(st.integers(1, 9 // h)), w * draw(st.integers(1, 9 // w)))
    return (big, small) if draw(st.booleans()) else (small, big)


@dataclass(frozen=True)
class Draft:
    """What a loss's draw returns: shapes, which inputs are the teacher's, options."""

    shapes: tuple[tuple[int, ...], ...]
    teacher: tuple[bool, ...]
    options: dict


def _pool_option(draw, *size_pairs) -> dict:
    """``pool=False`` is drawn only where no pair needs pooling (else the loss raises)."""
    if all(a == b for a, b in size_pairs) and draw(st.booleans()):
        return {"pool": False}
    return {}


@st.composite
def at_draft(draw) -> Draft:
    batch = draw(BATCH)
    s_hw, t_hw = draw(pooled_sizes())
    options = {"p": draw(st.sampled_from((1.0, 1.5, 2.0, 3.0))),
               "mode": draw(st.sampled_from(("code", "paper"))),
               **_pool_option(draw, (s_hw, t_hw))}
    return Draft(((batch, draw(channels()), *s_hw), (batch, draw(channels()), *t_hw)),
                 (False, True), options)


@st.composite
def sp_draft(draw) -> Draft:
    """Features of rank 2-4 (SP flattens each sample; only the batch must match)."""
    batch = draw(BATCH)

    def features():
        rank = draw(st.sampled_from((2, 3, 4)))
        return (batch, draw(channels()), *(draw(SIDE) for _ in range(rank - 2)))
    return Draft((features(), features()), (False, True), {})


@st.composite
def fsp_draft(draw) -> Draft:
    """1-2 layer pairs; per pair the student's and teacher's channels (C_a, C_b) match, the
    spatial sizes pool within each pair and differ between student and teacher."""
    batch = draw(BATCH)
    pairs = [(draw(channels()), draw(channels())) for _ in range(draw(st.integers(1, 2)))]
    student, teacher, size_pairs = [], [], []
    for c_a, c_b in pairs:
        for side in (student, teacher):
            hw_a, hw_b = draw(pooled_sizes())
            side += [(batch, c_a, *hw_a), (batch, c_b, *hw_b)]
            size_pairs.append((hw_a, hw_b))
    return Draft((*student, *teacher), (False,) * len(student) + (True,) * len(teacher),
                 _pool_option(draw, *size_pairs))


def nst_kernel() -> st.SearchStrategy[dict]:
    positive = st.floats(0.25, 4.0)
    return st.one_of(
        st.just({"kernel": "linear"}),
        st.fixed_dictionaries({"kernel": st.just("poly"), "degree": st.integers(1, 3),
                               "coef": st.just(0.0) | st.floats(0.1, 2.0)}),
        st.fixed_dictionaries({"kernel": st.just("rbf"), "sigma2": st.one_of(
            positive, st.lists(positive, min_size=2, max_size=3), st.just("mean"))}))


@st.composite
def nst_draft(draw) -> Draft:
    batch = draw(BATCH)
    s_hw, t_hw = draw(pooled_sizes())
    kernel = draw(nst_kernel())
    if kernel.get("sigma2") == "mean" and min(s_hw[0] * s_hw[1], t_hw[0] * t_hw[1]) == 1:
        # One pixel: every channel normalises to +-1, the exact gradient is 0 and "mean"
        # may be 0 (floored at 1e-12), amplifying rounding noise by 1e12 (tests/ops covers it).
        kernel = {"kernel": "rbf", "sigma2": 1.0}
    unbiased, teacher_term = draw(st.booleans()), draw(st.booleans())
    student = draw(channels(2 if unbiased else 1))
    teacher = draw(channels(2 if unbiased and teacher_term else 1))
    options = {**kernel, "unbiased": unbiased, "teacher_term": teacher_term,
               **_pool_option(draw, (s_hw, t_hw))}
    return Draft(((batch, student, *s_hw), (batch, teacher, *t_hw)), (False, True), options)


TEMPERATURE = st.floats(0.5, 8.0)


@st.composite
def kd_draft(draw) -> Draft:
    shape = (draw(BATCH), draw(CHANNELS))
    return Draft((shape, shape), (False, True), {"temperature": draw(TEMPERATURE)})


@st.composite
def dml_draft(draw) -> Draft:
    """The network's logits and 1-3 peers (detached inside: their gradients are None)."""
    shape, peers = (draw(BATCH), draw(CHANNELS)), draw(st.integers(1, 3))
    return Draft((shape,) * (1 + peers), (False,) + (True,) * peers,
                 {"temperature": draw(TEMPERATURE)})


@st.composite
def two_class_kd_draft(draw) -> Draft:
    """KD's draw with at least two classes (DKD's gold and others, LSKD's standard
    deviation)."""
    shape = (draw(BATCH), draw(CHANNELS.filter(lambda classes: classes >= 2)))
    return Draft((shape, shape), (False, True), {"temperature": draw(TEMPERATURE)})


@st.composite
def cwd_draft(draw) -> Draft:
    """Student and teacher maps of one shape (B, C, H, W): B·C rows of H·W positions."""
    shape = (draw(BATCH), draw(channels()), draw(SIDE), draw(SIDE))
    return Draft((shape, shape), (False, True), {"temperature": draw(TEMPERATURE),
                                                 "loss_weight": draw(st.floats(0.5, 4.0))})


def one_pixel(case: FuzzCase) -> bool:
    """The smaller map of a (student, teacher) pair, which both are pooled to, is 1 x 1."""
    return min(shape[2] * shape[3] for shape in case.shapes) == 1


def one_class(case: FuzzCase) -> bool:
    return case.shapes[0][1] == 1


def at_degenerate(case):  # one pixel: both maps are [1], loss and gradients 0
    return one_pixel(case), one_pixel(case)


def sp_degenerate(case):
    """One sample or both expanded: G_s = G_t. One feature per sample on a side: that side's
    rows of G are +-Q/||Q||, and a gradient is 0 for some sign patterns (e.g. a teacher of
    signs (+, +, -, -) against an expanded student)."""
    scalar_rows = any(math.prod(shape[1:]) == 1 for shape in case.shapes)
    same = case.shapes[0][0] == 1 or all(layout == "expanded" for layout in case.layouts)
    return same or scalar_rows, same or scalar_rows


def nst_degenerate(case):
    """One pixel: every channel normalises to +-1, the gradients are 0 and the value is 0
    for some sign patterns."""
    return one_pixel(case), one_pixel(case)


def kd_degenerate(case):  # one class: both softmaxes are [1]
    return one_class(case), one_class(case)


def lskd_degenerate(case):
    """Two classes: both standardised rows are +-(1, -1)/sqrt(2), equal for logits of the same
    order, and then the value and the gradients are 0."""
    return case.shapes[0][1] == 2, case.shapes[0][1] == 2


def softmax_value_noise(case):
    """A softmax divergence T²·D(p_t, p_s) is a difference of two cross-entropies of size
    log L (L classes per row) whatever D: in float32 any formula of it (torch's log_softmax
    pair, the fused one-sweep sum) errs by a few ulps of T²·log L, which for the small
    divergences of large T is far above the floor relative to the value. Each case's torch
    error is one sample of that size, not a bound (the errors of two formulas are independent),
    so the value may differ by 4 such ulps per row (times the loss's weight on the divergence:
    DKD's α + β, CWD's loss_weight; the norm over the rows under "sum" and "none")."""
    shape = case.shapes[0]
    maps = len(shape) == 4  # CWD: B·C rows of H·W positions
    rows, length = (shape[0] * shape[1], shape[2] * shape[3]) if maps else shape[:2]
    options = case.options
    weight = options.get("loss_weight", 1.0)
    if case.loss == "dkd_loss":
        weight = options.get("alpha", 1.0) + options.get("beta", 8.0)
    reduction = options["reduction"]
    samples = {"mean": 1.0, "sum": rows, "none": math.sqrt(shape[0])}[reduction]
    eps = torch.finfo(torch.float32).eps
    return 4 * eps * options["temperature"] ** 2 * weight * math.log(max(length, 2)) * samples


def student_teacher(fn):
    return lambda tensors, **kw: fn(*tensors, **kw)


def with_targets(fn):
    """A labelled loss on (student, teacher): the targets cycle through the classes."""
    def call(tensors, **kw):
        student = tensors[0]
        targets = torch.arange(student.shape[0], device=student.device) % student.shape[1]
        return fn(*tensors, targets, **kw)
    return call


def fsp_arguments(tensors, **kw):
    half = len(tensors) // 2
    student, teacher = tensors[:half], tensors[half:]
    return kdfast.functional.fsp_loss(list(zip(student[::2], student[1::2], strict=True)),
                                      list(zip(teacher[::2], teacher[1::2], strict=True)), **kw)


def dml_arguments(tensors, **kw):
    return kdfast.functional.dml_loss(tensors[0], list(tensors[1:]), **kw)


@dataclass(frozen=True)
class LossCases:
    core: str
    draft: Callable[[], st.SearchStrategy[Draft]]
    call: Callable  # call(tensors, backend=..., **options) -> loss
    # whether the (value, gradients) of a case can be 0 in exact arithmetic: then both sides
    # hold rounding noise, and the comparison allows that noise (rounding_noise) on top
    degenerate: Callable[[FuzzCase], tuple[bool, bool]] = lambda case: (False, False)
    # an absolute allowance on the value below float64 (see softmax_value_noise)
    value_noise: Callable[[FuzzCase], float] = lambda case: 0.0


LOSSES = {
    "at_loss": LossCases("attention_map", at_draft, student_teacher(kdfast.functional.at_loss),
                         at_degenerate),
    "sp_loss": LossCases("similarity", sp_draft, student_teacher(kdfast.functional.sp_loss),
                         sp_degenerate),
    "fsp_loss": LossCases("fsp", fsp_draft, fsp_arguments),
    "nst_loss": LossCases("channel_mmd", nst_draft,
                          student_teacher(kdfast.functional.nst_loss), nst_degenerate),
    "kd_loss": LossCases("softmax_kl", kd_draft, student_teacher(kdfast.functional.kd_loss),
                         kd_degenerate, softmax_value_noise),
    "dml_loss": LossCases("softmax_kl", dml_draft, dml_arguments, kd_degenerate,
                          softmax_value_noise),
    "dkd_loss": LossCases("softmax_kl", two_class_kd_draft,
                          with_targets(kdfast.functional.dkd_loss),
                          value_noise=softmax_value_noise),
    "lskd_loss": LossCases("softmax_kl", two_class_kd_draft,
                           student_teacher(kdfast.functional.lskd_loss), lskd_degenerate,
                           softmax_value_noise),
    "wsld_loss": LossCases("softmax_kl", kd_draft, with_targets(kdfast.functional.wsld_loss),
                           kd_degenerate, softmax_value_noise),
    "cwd_loss": LossCases("softmax_kl", cwd_draft, student_teacher(kdfast.functional.cwd_loss),
                          lambda case: (one_pixel(case), one_pixel(case)),
                          softmax_value_noise),
}


def layouts_for(shape: tuple[int, ...]) -> st.SearchStrategy[str]:
    return st.sampled_from([layout for layout in LAYOUTS
                            if layout != "channels_last" or len(shape) == 4])


@st.composite
def fuzz_cases(draw, loss: str, dtypes: Sequence[torch.dtype]) -> FuzzCase:
    """A random :class:`FuzzCase` of ``loss`` in one of ``dtypes``."""
    draft = draw(LOSSES[loss].draft())
    teacher_grad = draw(st.booleans())
    reduction = draw(st.sampled_from(REDUCTIONS))
    grad_output = None
    if reduction != "none":
        magnitude = draw(st.floats(0.25, 4.0).filter(lambda g: g != 1.0))
        grad_output = magnitude * draw(st.sampled_from((1.0, -1.0)))
    return FuzzCase(
        loss=loss, shapes=draft.shapes,
        layouts=tuple(draw(layouts_for(shape)) for shape in draft.shapes),
        requires_grad=tuple(not teacher or teacher_grad for teacher in draft.teacher),
        dtype=draw(st.sampled_from(dtypes)),
        options={**draft.options, "reduction": reduction},
        grad_output=grad_output, seed=draw(st.integers(0, 2**31 - 1)))
