"""One parity table per fused core, run on every backend: native-cpu, native-cuda, triton.

Each core has a list of :class:`Sample` (PyTorch OpInfo's ``sample_inputs``: awkward shapes
such as odd channel counts, maps that are not a multiple of a block, a batch of one, one
pixel; non-contiguous layouts; all-zero channels; a teacher without gradient), each run in
the dtypes it lists through ``kdfast.backends.implementations(core)[backend].fn`` and
compared with the core's reference in float64 by ``tests.helpers.assert_matches_reference``
(values and gradients, one rule below float64). A hypothesis test draws further shapes per
core, and every backend must give bit-identical outputs when run twice.

Backends are pytest params with a marker each: ``native-cuda`` (``gpu``) skips with a reason
without a CUDA device and a CUDA build; ``triton`` (``triton_interpret``) runs only in the
Triton process (``make test-triton``: under the interpreter, or on a CUDA device without
``TRITON_INTERPRET``). Documented limits skip with their reason: the interpreter has no
bfloat16, and the Triton Gram/MMD kernels take no float64 on CUDA.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

import kdfast
from kdfast import backends
from tests.fuzz_cases import LAYOUTS, fuzz_settings, laid_out, nst_kernel
from tests.helpers import (
    assert_matches_reference,
    fresh_leaves,
    seeded_grad_output,
    tf32_matmul,
    triton_device,
    value_and_grads,
)

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
ALL_DTYPES = (F64, F32, F16, BF16)
CORES = ("attention_map", "similarity", "fsp", "channel_mmd", "softmax_kl")

NO_CUDA = not (torch.cuda.is_available() and kdfast.available_backends()["native_cuda"])
BACKENDS = [
    pytest.param("native-cpu", marks=pytest.mark.skipif(
        not kdfast.available_backends()["native"], reason="native extension not built")),
    pytest.param("native-cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        NO_CUDA, reason="needs a CUDA device and the extension built with CUDA")]),
    pytest.param("triton", marks=pytest.mark.triton_interpret),
]


@pytest.fixture(params=BACKENDS)
def backend(request) -> tuple[str, str]:
    """(registered backend name, device) of the param."""
    if request.param == "native-cpu":
        return "native", "cpu"
    if request.param == "native-cuda":
        return "native", "cuda"
    device = triton_device()
    if device is None:
        pytest.skip("Triton runs need CUDA or the interpreter: run `make test-triton`")
    pytest.importorskip("triton")
    return "triton", device


def skip_if_unsupported(name: str, device: str, core: str, dtype: torch.dtype) -> None:
    """Skips the documented dtype limits of a backend; any other refusal fails the test."""
    if name != "triton":
        return
    if device == "cpu" and dtype == BF16:
        pytest.skip("the Triton interpreter has no bfloat16: this case runs on a GPU")
    if device == "cuda" and dtype == F64 and core in DOT_CORES:
        pytest.skip("the Triton Gram/MMD kernels take no float64 on CUDA (tl.dot)")


DOT_CORES = ("similarity", "fsp", "channel_mmd")  # Triton kernels with tl.dot


def implementation(core: str, name: str, inputs) -> backends.Implementation:
    impl = backends.implementations(core)[name]
    reason = impl.supports(*inputs)
    assert reason is None, f"{name} must run {core} on these inputs, but: {reason}"
    return impl


# --- the samples ------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    """Inputs of one core call (OpInfo's SampleInput): shapes, per-input layout (a name in
    fuzz_cases.LAYOUTS, "batch_sliced" or "channel_expanded"), per-input requires_grad,
    all-zero entries ``(input, index)``, keyword options, the dtypes it runs in, and which
    outputs are 0 in exact arithmetic (value, gradients)."""

    name: str
    shapes: tuple[tuple[int, ...], ...]
    options: dict = field(default_factory=dict)
    layouts: tuple[str, ...] = ()
    grads: tuple[bool, ...] = ()
    zeros: tuple[tuple[int, tuple], ...] = ()
    dtypes: tuple[torch.dtype, ...] = (F64,)
    degenerate: tuple[bool, bool] = (False, False)

    def inputs(self, device: str, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)

        def values(shape):
            return torch.randn(shape, dtype=F64, generator=generator).to(device, dtype)
        out = []
        for i, shape in enumerate(self.shapes):
            layout = self.layouts[i] if self.layouts else "contiguous"
            if layout == "batch_sliced":
                x = values((2 * shape[0], *shape[1:]))[::2]
            elif layout == "channel_expanded":
                x = values((shape[0], 1, *shape[2:])).expand(shape)
            else:
                x = laid_out(values, shape, layout)
            for index, where in self.zeros:
                if index == i:
                    x[where] = 0
            out.append(x.requires_grad_(self.grads[i] if self.grads else True))
        return out


def attention_samples() -> list[Sample]:
    samples = []
    for shape in [(1, 1, 1, 1), (1, 3, 1, 5), (2, 3, 5, 7), (1, 17, 13, 11), (3, 17, 13, 11),
                  (3, 9, 12, 3), (2, 4, 40, 41)]:
        one_pixel = shape[2] * shape[3] == 1  # the map is [1]: its gradient is 0
        for p in (1.0, 2.0, 3.5):
            samples.append(Sample(f"{'x'.join(map(str, shape))}-p{p}", (shape,), {"p": p},
                                  degenerate=(False, one_pixel)))
    for layout in ("channels_last", "transposed", "sliced", "batch_sliced", "expanded",
                   "channel_expanded"):
        samples.append(Sample(layout, ((3, 6, 5, 7),), layouts=(layout,), dtypes=(F64, F32)))
    samples += [
        Sample("zero-channel-and-sample-p1", ((3, 3, 4, 4),), {"p": 1.0},
               zeros=((0, (0, 1)), (0, (1,)))),
        Sample("zero-channel-and-sample-p2", ((3, 3, 4, 4),), zeros=((0, (0, 1)), (0, (1,)))),
        Sample("zero-channel-and-sample-p3", ((3, 3, 4, 4),), {"p": 3.0},
               zeros=((0, (0, 1)), (0, (1,)))),
        Sample("zero-channel-and-sample-odd-hw", ((2, 3, 4, 5),), zeros=((0, (0, 1)), (0, (1,)))),
        Sample("odd-c-f32", ((4, 33, 9, 11),), dtypes=(F32,)),
        Sample("odd-c-f32-channels_last", ((4, 33, 9, 11),), layouts=("channels_last",),
               dtypes=(F32,)),
        Sample("low-precision", ((2, 9, 6, 7),), dtypes=ALL_DTYPES),
        Sample("all-dtypes", ((3, 17, 13, 11),), dtypes=ALL_DTYPES),
        Sample("all-dtypes-channels_last", ((3, 17, 13, 11),), layouts=("channels_last",),
               dtypes=ALL_DTYPES),
    ]
    return samples


def gram_pair(name, student, teacher, teacher_grad=True, **kw) -> Sample:
    return Sample(name, (student, teacher), grads=(True, teacher_grad), **kw)


def similarity_samples() -> list[Sample]:
    samples = []
    for student, teacher in [((1, 3, 2, 2), (1, 5, 2, 2)), ((2, 1, 1, 1), (2, 1, 1, 1)),
                             ((5, 3, 5, 7), (5, 6, 4, 3)), ((7, 13), (7, 9)),
                             ((4, 2, 3, 3, 2), (4, 3)), ((5, 3, 4, 5), (5, 7, 2, 3)),
                             ((19, 3, 3, 3), (19, 11)), ((2, 1, 1, 1), (2, 40, 1, 1))]:
        for teacher_grad in (True, False):
            name = f"{student}-{teacher}{'' if teacher_grad else '-teacher-fixed'}"
            samples.append(gram_pair(name.replace(" ", ""), student, teacher, teacher_grad))
    for layout in ("channels_last", "transposed", "sliced"):
        samples.append(Sample(layout, ((3, 4, 5, 3), (3, 2, 3, 3)), layouts=(layout, layout),
                              dtypes=(F64, F32)))
    samples += [
        gram_pair("channels_last-transposed-teacher-fixed", (6, 5, 3, 7), (6, 4, 5, 9), False,
                  layouts=("channels_last", "transposed")),
        gram_pair("zero-channels-and-sample", (4, 3, 4, 4), (4, 5, 4, 4), False,
                  zeros=((0, (0, 1)), (0, (2,)), (1, (1, 0)))),
        gram_pair("zero-sample", (4, 3, 2, 5), (4, 6, 2, 5), zeros=((0, (1,)),)),
        gram_pair("low-precision", (6, 9, 5, 5), (6, 13, 5, 5), dtypes=ALL_DTYPES),
        gram_pair("low-precision-odd", (7, 5, 3, 3), (7, 6, 3, 3), dtypes=ALL_DTYPES),
    ]
    return samples


def fsp_quad(name, b, ca, cb, hw_s, hw_t, teacher_grad=True, **kw) -> Sample:
    shapes = ((b, ca, *hw_s), (b, cb, *hw_s), (b, ca, *hw_t), (b, cb, *hw_t))
    return Sample(name, shapes, grads=(True, True, teacher_grad, teacher_grad), **kw)


def fsp_samples() -> list[Sample]:
    samples = []
    for b, ca, cb, hw_s, hw_t in [(1, 1, 1, (1, 1), (1, 1)), (2, 3, 5, (5, 7), (5, 7)),
                                  (3, 7, 4, (4, 4), (2, 3)), (1, 9, 2, (1, 13), (3, 1)),
                                  (2, 3, 17, (5, 7), (4, 3)), (2, 1, 1, (1, 1), (2, 2)),
                                  (2, 18, 5, (3, 6), (3, 6))]:
        for teacher_grad in (True, False):
            name = f"{b}x{ca}x{cb}-{hw_s}-{hw_t}{'' if teacher_grad else '-teacher-fixed'}"
            samples.append(fsp_quad(name.replace(" ", ""), b, ca, cb, hw_s, hw_t, teacher_grad))
    for layout in ("channels_last", "transposed", "sliced"):
        samples.append(fsp_quad(layout, 3, 4, 5, (5, 3), (2, 3), layouts=(layout,) * 4,
                                dtypes=(F64, F32)))
    samples += [
        Sample("mixed-layouts-batch-1-teacher-fixed", ((1, 4, 5, 6), (1, 6, 5, 6),
                                                       (1, 4, 3, 3), (1, 6, 3, 3)),
               layouts=("channels_last", "transposed", "contiguous", "sliced"),
               grads=(True, True, False, False)),
        fsp_quad("zero-channels-and-samples", 3, 3, 4, (3, 3), (3, 3),
                 zeros=((0, (0, 1)), (1, (1,)), (3, (2,)))),
        fsp_quad("zero-channel", 2, 3, 5, (4, 4), (2, 2), zeros=((0, (0, 1)),)),
        fsp_quad("low-precision", 3, 9, 13, (6, 5), (6, 5), dtypes=ALL_DTYPES),
        fsp_quad("low-precision-odd", 2, 5, 7, (4, 4), (3, 3), dtypes=ALL_DTYPES),
    ]
    return samples


MMD_OPTIONS = [
    {"kernel": "linear"},
    {"kernel": "linear", "unbiased": True},
    {"kernel": "poly"},
    {"kernel": "poly", "degree": 3, "coef": 0.7, "teacher_term": False},
    {"kernel": "rbf", "sigma2": (1.0,)},
    {"kernel": "rbf", "sigma2": (0.3, 2.0, 9.0), "unbiased": True},
    {"kernel": "rbf", "sigma2": "mean"},
    {"kernel": "rbf", "sigma2": "mean", "unbiased": True, "teacher_term": False},
]
LOW_PRECISION_MMD = [{"kernel": "linear"}, {"kernel": "poly", "degree": 2, "coef": 0.0},
                     {"kernel": "rbf", "sigma2": (1.0,)}, {"kernel": "rbf", "sigma2": "mean"}]


def option_name(options: dict) -> str:
    return "-".join(str(v).replace(" ", "") for v in options.values())


def mmd_samples() -> list[Sample]:
    samples = [gram_pair(f"odd-c-{option_name(o)}", (2, 5, 3, 7), (2, 19, 3, 7), options=o)
               for o in MMD_OPTIONS]
    for o in [{}, {"coef": 0.5, "unbiased": True}, {"teacher_term": False}]:
        # H·W = 16 >= C_s + C_t: the C × C Gram path of poly-2
        samples.append(gram_pair(f"poly2-channel-grams-{option_name(o)}", (2, 5, 4, 4),
                                 (2, 9, 4, 4), options={"kernel": "poly", **o}))
    samples.append(gram_pair("poly2-feature-grams", (2, 7, 3, 2), (2, 4, 3, 2),
                             options={"kernel": "poly", "coef": 0.3}))  # H·W = 6 < 11
    for kernel in ("linear", "poly", "rbf"):
        samples.append(gram_pair(f"batch-1-layouts-teacher-fixed-{kernel}", (1, 6, 5, 3),
                                 (1, 7, 5, 3), False, layouts=("channels_last", "transposed"),
                                 options={"kernel": kernel, "sigma2": "mean"}))
        samples.append(gram_pair(f"zero-channels-{kernel}", (2, 4, 3, 3), (2, 3, 3, 3),
                                 zeros=((0, (0, 1)), (1, (1, 2))),
                                 options={"kernel": kernel, "sigma2": "mean", "unbiased": True}))
    samples.append(gram_pair("more-channels-than-a-tile", (1, 21, 2, 9), (1, 34, 2, 9),
                             options={"kernel": "rbf", "sigma2": (2.0,), "unbiased": True}))
    for kernel in ("linear", "rbf"):
        for teacher_term in (True, False):
            samples.append(Sample(f"teacher-gradient-alone-{kernel}-{teacher_term}",
                                  ((2, 7, 3, 4), (2, 4, 3, 4)), grads=(False, True),
                                  options={"kernel": kernel, "sigma2": (0.5, 1.5),
                                           "teacher_term": teacher_term, "unbiased": True}))
    for o in LOW_PRECISION_MMD:
        for hw in ((6, 5), (3, 4)):  # 12 < 19 channels: the D × D path of poly-2
            samples.append(gram_pair(f"low-precision-{option_name(o)}-hw{hw[0] * hw[1]}",
                                     (2, 11, *hw), (2, 8, *hw), options=o, dtypes=ALL_DTYPES))
    return samples


DIVERGENCES = [{"divergence": "forward"}, {"divergence": "reverse"},
               {"divergence": "jsd", "beta": 0.3}]


def logit_pair(name, rows, length, teacher_grad=True, **kw) -> Sample:
    return Sample(name, ((rows, length), (rows, length)), grads=(True, teacher_grad), **kw)


def softmax_kl_samples() -> list[Sample]:
    """Rows of length 1 (every softmax is 1: loss and gradients 0), 3, one past a CPU block
    (513) and several blocks (1537); strided rows; temperatures around 1; each divergence."""
    samples = []
    for o in DIVERGENCES:
        d = option_name(o)
        samples.append(logit_pair(f"length-1-{d}", 3, 1, options={"temperature": 2.0, **o},
                                  degenerate=(True, True)))
        samples.append(logit_pair(f"length-3-{d}", 4, 3, options={"temperature": 0.7, **o}))
        samples.append(logit_pair(f"past-a-block-{d}", 2, 513, False,
                                  options={"temperature": 4.0, **o}))
        samples.append(logit_pair(f"several-blocks-layouts-{d}", 3, 1537,
                                  layouts=("sliced", "batch_sliced"),
                                  options={"temperature": 1.0, **o}))
        samples.append(logit_pair(f"low-precision-{d}", 5, 37, options={"temperature": 2.0, **o},
                                  dtypes=ALL_DTYPES))
    samples.append(logit_pair("transposed-expanded", 4, 9, layouts=("transposed", "expanded"),
                              options={"temperature": 3.0}))
    return samples


SAMPLES = {"attention_map": attention_samples(), "similarity": similarity_samples(),
           "fsp": fsp_samples(), "channel_mmd": mmd_samples(),
           "softmax_kl": softmax_kl_samples()}
CASES = [(core, sample, dtype) for core, samples in SAMPLES.items() for sample in samples
         for dtype in sample.dtypes]


def case_id(case) -> str:
    core, sample, dtype = case
    return f"{core}-{sample.name}-{str(dtype).removeprefix('torch.')}"


# Gradients of channels_last inputs keep their strides, except the native channel MMD's
# (it returns contiguous gradients).
CONTIGUOUS_GRADIENTS = {("native", "channel_mmd")}


def run_core(core: str, name: str, sample_options: dict, inputs):
    impl = implementation(core, name, inputs)
    reference = backends.implementations(core)["reference"].fn
    return (functools.partial(impl.fn, **sample_options),
            functools.partial(reference, **sample_options))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(backend, case):
    core, sample, dtype = case
    name, device = backend
    skip_if_unsupported(name, device, core, dtype)
    inputs = sample.inputs(device, dtype)
    fast, reference = run_core(core, name, sample.options, inputs)
    with tf32_matmul(False):
        assert_matches_reference(fast, reference, inputs, degenerate=sample.degenerate,
                                 keep_channels_last=(name, core) not in CONTIGUOUS_GRADIENTS,
                                 what=f"{name} on {device}")


# --- determinism: run twice, bit-identical ----------------------------------------------

# Large enough for parallel reductions on a device (and across CPU threads); the
# interpreter runs its programs one after another, so it gets small shapes.
DETERMINISM = {
    "attention_map": Sample("odd", ((4, 33, 20, 20),)),
    "similarity": gram_pair("odd", (9, 17, 6, 6), (9, 8, 6, 6)),
    "fsp": fsp_quad("odd", 4, 16, 9, (6, 6), (5, 5)),
    "channel_mmd": gram_pair("odd", (5, 70, 6, 6), (5, 66, 6, 6), options={"kernel": "rbf"}),
    "softmax_kl": logit_pair("odd", 33, 3001, options={"temperature": 4.0}),
}
INTERPRETER_DETERMINISM = {
    "attention_map": Sample("odd", ((3, 7, 11, 13),)),
    "similarity": gram_pair("odd", (9, 5, 4, 4), (9, 3, 4, 4)),
    "fsp": fsp_quad("odd", 2, 3, 5, (4, 4), (4, 4)),
    "channel_mmd": gram_pair("odd", (2, 20, 4, 4), (2, 7, 4, 4), options={"kernel": "rbf"}),
    "softmax_kl": logit_pair("odd", 3, 77, options={"temperature": 4.0}),
}


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("core", CORES)
def test_deterministic(backend, core, dtype):
    name, device = backend
    skip_if_unsupported(name, device, core, dtype)
    sample = (INTERPRETER_DETERMINISM if (name, device) == ("triton", "cpu") else DETERMINISM)[core]
    inputs = sample.inputs(device, dtype)
    fast, _ = run_core(core, name, sample.options, inputs)
    first, second = (value_and_grads(fast, fresh_leaves(inputs), seeded_grad_output())
                     for _ in range(2))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b), f"{name} {core} in {dtype}: two runs differ"


# --- hypothesis: random shapes, layouts and options per core ----------------------------

BATCH, CHANNELS = st.integers(1, 4), st.integers(1, 9)
LOGIT_LAYOUTS = ["contiguous", "sliced", "transposed", "expanded", "batch_sliced"]
SIDES = {"attention_map": st.integers(1, 9), "similarity": st.integers(1, 6),
         "fsp": st.integers(1, 6), "channel_mmd": st.integers(1, 5), "softmax_kl": st.just(1)}


def layouts(count: int):
    return st.tuples(*[st.sampled_from([*LAYOUTS, "batch_sliced", "channel_expanded"])] * count)


@st.composite
def drawn_samples(draw, core: str) -> Sample:
    b, h, w = draw(BATCH), draw(SIDES[core]), draw(SIDES[core])
    c_s, c_t = draw(CHANNELS), draw(CHANNELS)
    one_pixel = h * w == 1
    teacher_grad = draw(st.booleans())
    if core == "attention_map":
        return Sample("drawn", ((b, c_s, h, w),), {"p": draw(st.sampled_from((1.0, 2.0, 2.5)))},
                      layouts=draw(layouts(1)), degenerate=(False, one_pixel))
    if core == "similarity":
        chosen = draw(layouts(2))
        # one sample, or both rows expanded: G_s = G_t; one feature per sample: rows of ±1
        same = b == 1 or chosen == ("expanded", "expanded") or c_s * h * w == 1 or c_t == 1
        return gram_pair("drawn", (b, c_s, h, w), (b, c_t, w, h), teacher_grad,
                         layouts=chosen, degenerate=(same, same))
    if core == "softmax_kl":
        length = draw(st.integers(1, 40))
        options = {"temperature": draw(st.sampled_from((0.5, 1.0, 4.0))),
                   **draw(st.sampled_from(DIVERGENCES))}
        return logit_pair("drawn", b, length, teacher_grad, options=options,
                          layouts=draw(st.tuples(*[st.sampled_from(LOGIT_LAYOUTS)] * 2)),
                          degenerate=(length == 1, length == 1))
    if core == "fsp":
        return fsp_quad("drawn", b, c_s, c_t, (h, w), (w, h), teacher_grad,
                        layouts=draw(layouts(4)))
    options = {**draw(nst_kernel()), "unbiased": draw(st.booleans()),
               "teacher_term": draw(st.booleans())}
    if options["unbiased"] and (c_s < 2 or (options["teacher_term"] and c_t < 2)):
        options["unbiased"] = False
    if one_pixel and options.get("sigma2") == "mean":  # sigma2 may be 0 (floored at 1e-12)
        options["sigma2"] = (1.0,)
    # one pixel: every channel normalises to ±1, the gradients (and some values) are 0
    return gram_pair("drawn", (b, c_s, h, w), (b, c_t, h, w), teacher_grad, options=options,
                     layouts=draw(layouts(2)), degenerate=(one_pixel, one_pixel))


@pytest.mark.parametrize("core", CORES)
@fuzz_settings(examples=20, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_matches_reference_on_drawn_samples(backend, core, data):
    name, device = backend
    sample = data.draw(drawn_samples(core), label="sample")
    dtype = F32 if (name, device) == ("triton", "cuda") and core in DOT_CORES else F64
    inputs = sample.inputs(device, dtype, seed=data.draw(st.integers(0, 2**16), label="seed"))
    fast, reference = run_core(core, name, sample.options, inputs)
    with tf32_matmul(False):
        assert_matches_reference(fast, reference, inputs, degenerate=sample.degenerate,
                                 what=f"{name} on {device}: {sample}")
