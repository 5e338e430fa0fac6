"""fused_linear_kd_loss: the chunked native sweep against the eager reference (first
slice)."""

from __future__ import annotations

import pytest
import torch

import kdfast
from kdfast.losses.fused_linear_kd import fused_linear_kd_loss
from kdfast.ops.fused_linear_kd import CHUNK_BUDGET_BYTES, LIVE_CHUNK_TENSORS, default_chunk_size
from kdfast.reference.fused_linear_kd import fused_linear_kd
from tests.helpers import assert_matches_reference, assert_rel_close, randn

TOKENS, HIDDEN, TEACHER_HIDDEN, VOCAB = 37, 8, 6, 101  # 37 = 4 chunks of 8 and 5; 101 prime
CHUNK = 8
DIVERGENCES = (("forward", 0.5), ("reverse", 0.5), ("jsd", 0.3), ("jsd", 0.0))
TEACHER_FORMS = ("hidden", "logits")


def token_labels(seed: int = 3, tokens: int = TOKENS) -> torch.Tensor:
    """Token ids with some ignored tokens, among them all of the second chunk (rows 8-15)."""
    labels = torch.randint(0, VOCAB, (tokens,), generator=torch.Generator().manual_seed(seed))
    labels[CHUNK:2 * CHUNK] = -100
    labels[::5] = -100
    return labels


def problem(dtype=torch.float64, teacher_form="hidden", bias=True, scale=1.0, tokens=TOKENS):
    """[student hidden, weight, (bias)] requiring grad, then the teacher tensors."""
    student = [randn(tokens, HIDDEN, seed=0, dtype=dtype, requires_grad=True),
               (scale * randn(VOCAB, HIDDEN, seed=1)).to(dtype).requires_grad_()]
    if bias:
        student.append(randn(VOCAB, seed=2, dtype=dtype, requires_grad=True))
    if teacher_form == "logits":
        teacher = [(scale * randn(tokens, VOCAB, seed=4)).to(dtype)]
    else:
        teacher = [randn(tokens, TEACHER_HIDDEN, seed=5, dtype=dtype),
                   (scale * randn(VOCAB, TEACHER_HIDDEN, seed=6)).to(dtype),
                   randn(VOCAB, seed=7, dtype=dtype)]
    return student + teacher


def loss_fn(function, teacher_form="hidden", bias=True, **options):
    """``function(*tensors)`` for the tensors of :func:`problem` (labels and options bound)."""
    def call(*tensors):
        if bias:
            hidden, weight, student_bias, *teacher = tensors
        else:
            (hidden, weight, *teacher), student_bias = tensors, None
        if teacher_form == "logits":
            teacher_args = {"teacher_logits": teacher[0]}
        else:
            teacher_args = {"teacher_hidden": teacher[0], "teacher_weight": teacher[1],
                            "teacher_bias": teacher[2]}
        return function(hidden, weight, student_bias=student_bias, **teacher_args, **options)
    return call


def native(**options):
    return lambda *args, **kw: fused_linear_kd_loss(*args, backend="native",
                                                    chunk_size=CHUNK, **kw, **options)


DEFAULTS = {"labels": None, "temperature": 2.0, "soft_weight": 0.7, "hard_weight": 0.0}


@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("teacher_form", TEACHER_FORMS)
@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
def test_chunked_matches_reference_float64(divergence, beta, teacher_form, reduction):
    options = {"labels": token_labels(), "divergence": divergence, "beta": beta,
               "temperature": 2.0, "soft_weight": 0.7, "hard_weight": 0.4,
               "reduction": reduction}
    assert_matches_reference(loss_fn(native(), teacher_form, **options),
                             loss_fn(fused_linear_kd, teacher_form, **options),
                             problem(teacher_form=teacher_form), what=divergence)


@pytest.mark.parametrize("teacher_form", TEACHER_FORMS)
def test_without_labels_or_bias_every_token_counts(teacher_form):
    options = {"temperature": 1.5, "num_items": 50}
    assert_matches_reference(loss_fn(native(), teacher_form, bias=False, **options),
                             loss_fn(fused_linear_kd, teacher_form, bias=False, **options),
                             problem(teacher_form=teacher_form, bias=False))


@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
@pytest.mark.parametrize("backend", ("native", "reference"))
def test_all_tokens_ignored_give_zero_and_zero_gradients(reduction, backend):
    tensors = problem()
    labels = torch.full((TOKENS,), -100)
    loss = loss_fn(lambda *a, **k: fused_linear_kd_loss(*a, backend=backend, **k),
                   labels=labels, hard_weight=1.0, reduction=reduction)(*tensors)
    assert torch.equal(loss, torch.zeros_like(loss))
    grads = torch.autograd.grad(loss.sum(), tensors[:3])
    for grad in grads:
        assert torch.equal(grad, torch.zeros_like(grad))


def test_logits_at_1e4_stay_finite_and_match():
    options = {"labels": token_labels(), "hard_weight": 0.5, "divergence": "jsd"}
    tensors = problem(scale=3e3)
    logits = tensors[0] @ tensors[1].T
    assert logits.abs().max() > 1e4
    assert_matches_reference(loss_fn(native(), **options), loss_fn(fused_linear_kd, **options),
                             tensors, rtol64=1e-9)


@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_grad_output_is_applied(reduction):
    options = {"labels": token_labels(), "hard_weight": 0.5, "reduction": reduction}
    assert_matches_reference(loss_fn(native(), **options), loss_fn(fused_linear_kd, **options),
                             problem(), grad_output=lambda value: torch.full_like(value, -2.5))


@pytest.mark.parametrize("teacher_form", TEACHER_FORMS)
def test_bfloat16_accumulates_in_float32(teacher_form):
    options = {"labels": token_labels(), "hard_weight": 0.5, "temperature": 2.0}
    got = assert_matches_reference(loss_fn(native(), teacher_form, **options),
                                   loss_fn(fused_linear_kd, teacher_form, **options),
                                   problem(torch.bfloat16, teacher_form))
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16


def test_tied_weights_add_up():
    """The lm_head weight also embeds the tokens: both uses' gradients reach it."""
    ids = torch.randint(0, VOCAB, (TOKENS,), generator=torch.Generator().manual_seed(9))
    teacher = randn(TOKENS, VOCAB, seed=10)
    weight_grads = []
    for function in (native(), fused_linear_kd):
        weight = randn(VOCAB, HIDDEN, seed=1, requires_grad=True)
        hidden = torch.tanh(weight[ids])
        loss = function(hidden, weight, teacher_logits=teacher, labels=token_labels(),
                        hard_weight=0.3)
        (grad,) = torch.autograd.grad(loss, weight)
        weight_grads.append(grad)
    assert_rel_close(weight_grads[0], weight_grads[1], 1e-10, "tied weight")


def test_deterministic():
    options = {"labels": token_labels(), "hard_weight": 0.5}
    runs = []
    for _ in range(2):
        tensors = problem(torch.float32)
        loss = loss_fn(native(), **options)(*tensors)
        runs.append([loss, *torch.autograd.grad(loss, tensors[:3])])
    for first, second in zip(*runs, strict=True):
        assert torch.equal(first, second)


def test_num_items_half_batches_equal_one_batch():
    labels = token_labels()
    kept = int((labels != -100).sum())
    whole = problem()
    loss = loss_fn(native(), labels=labels, hard_weight=0.5)(*whole)
    want = torch.autograd.grad(loss, whole[:3])
    tensors = problem()
    half = TOKENS // 2
    total = 0.0
    for rows in (slice(0, half), slice(half, TOKENS)):
        part = [tensors[0][rows], tensors[1], tensors[2], tensors[3][rows], *tensors[4:]]
        total = total + loss_fn(native(), labels=labels[rows], hard_weight=0.5,
                                num_items=kept)(*part)
    got = torch.autograd.grad(total, tensors[:3])
    assert_rel_close(total, loss, 1e-12, "loss")
    for g, w in zip(got, want, strict=True):
        assert_rel_close(g, w, 1e-12, "gradient")


def test_num_items_as_a_0d_tensor_equals_the_int():
    labels = token_labels()
    kept = int((labels != -100).sum())
    as_int = loss_fn(native(), labels=labels, num_items=kept + 3)(*problem())
    as_tensor = loss_fn(native(), labels=labels, num_items=torch.tensor(kept + 3))(*problem())
    assert torch.equal(as_int, as_tensor)
    for bad in (torch.tensor([kept]), torch.tensor(float(kept)), torch.tensor(True)):
        with pytest.raises(TypeError, match="num_items must be an int or a 0-d integer tensor"):
            loss_fn(native(), labels=labels, num_items=bad)(*problem())


@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_keeps_nothing_of_size_tokens_by_vocab(reduction):
    """Only (N, H), (V, H), (V,) and (N,)-sized tensors are saved for the backward."""
    tokens, vocab = 64, 4099
    shapes = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor
    hidden = randn(tokens, HIDDEN, seed=0, requires_grad=True)
    weight = randn(vocab, HIDDEN, seed=1, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = fused_linear_kd_loss(hidden, weight, randn(tokens, TEACHER_HIDDEN, seed=2),
                                    randn(vocab, TEACHER_HIDDEN, seed=3), chunk_size=16,
                                    reduction=reduction, backend="native")
    assert shapes and all(torch.Size(shape).numel() <= vocab * HIDDEN for shape in shapes)
    loss.sum().backward()
    assert hidden.grad.shape == hidden.shape and weight.grad.shape == weight.shape


def test_sequence_shape_and_module():
    hidden = randn(2, 5, HIDDEN, seed=0)
    weight = randn(VOCAB, HIDDEN, seed=1)
    teacher = randn(2, 5, VOCAB, seed=2)
    labels = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    criterion = kdfast.FusedLinearKDLoss(temperature=2.0, hard_weight=0.5, reduction="none")
    per_token = criterion(hidden, weight, teacher_logits=teacher, labels=labels)
    assert per_token.shape == (2, 5)
    want = kdfast.functional.fused_linear_kd_loss(
        hidden.reshape(10, HIDDEN), weight, teacher_logits=teacher.reshape(10, VOCAB),
        labels=labels.reshape(10), temperature=2.0, hard_weight=0.5, reduction="none")
    assert_rel_close(per_token.reshape(10), want, 1e-12)


def test_second_derivatives_follow_the_reference():
    options = {"labels": token_labels(), "hard_weight": 0.5}
    results = []
    for function in (native(), fused_linear_kd):
        tensors = problem()
        loss = loss_fn(function, **options)(*tensors)
        (grad_hidden,) = torch.autograd.grad(loss, tensors[0], create_graph=True)
        results.append(torch.autograd.grad(grad_hidden.square().sum(), tensors[1]))
    assert_rel_close(results[0][0], results[1][0], 1e-10, "second derivative")


def test_teacher_gets_no_gradient():
    hidden, weight = randn(4, HIDDEN, seed=0, requires_grad=True), randn(VOCAB, HIDDEN, seed=1)
    teacher = randn(4, VOCAB, seed=2, requires_grad=True)
    loss = fused_linear_kd_loss(hidden, weight, teacher_logits=teacher, backend="native")
    loss.backward()
    assert teacher.grad is None and hidden.grad is not None


@pytest.mark.parametrize("call,match", [
    (lambda h, w, t: fused_linear_kd_loss(h, w), "pass exactly one teacher"),
    (lambda h, w, t: fused_linear_kd_loss(h, w, h, w, teacher_logits=t),
     "pass exactly one teacher"),
    (lambda h, w, t: fused_linear_kd_loss(h, w, h), "teacher_weight is missing"),
    (lambda h, w, t: fused_linear_kd_loss(h, w, teacher_logits=t[:, :-1], divergence="reverse"),
     "the teacher lacks ids 100..100"),
    (lambda h, w, t: fused_linear_kd_loss(h, w[:-2], h, w), "the student lacks ids 99..100"),
    (lambda h, w, t: fused_linear_kd_loss(h, w[:-2], h, w, divergence="jsd", beta=0.0),
     "KL\\(p_t \\|\\| p_s\\) is \\+inf for every token"),
    (lambda h, w, t: fused_linear_kd_loss(h, w, teacher_logits=t[:, :-1],
                                          divergence="skew_reverse", alpha=0.0),
     "use a divergence that stays finite"),
    (lambda h, w, t: fused_linear_kd_loss(h, w.T, teacher_logits=t), "hidden size"),
    (lambda h, w, t: fused_linear_kd_loss(h, w, teacher_logits=t[:-1]), "same batch size"),
    (lambda h, w, t: fused_linear_kd_loss(h, w, teacher_logits=t, hard_weight=1.0),
     "hard_weight > 0 needs labels"),
    (lambda h, w, t: fused_linear_kd_loss(h, w, teacher_logits=t,
                                          labels=torch.full((4,), VOCAB)), "token ids in"),
    (lambda h, w, t: fused_linear_kd_loss(h, w, teacher_logits=t, labels=torch.zeros(3).long()),
     "one id per token"),
    (lambda h, w, t: fused_linear_kd_loss(h, w, teacher_logits=t, student_bias=w[0]),
     "student_bias must have shape"),
    (lambda h, w, t: fused_linear_kd_loss(h, w, teacher_logits=t, divergence="kl"),
     "divergence must be one of"),
    (lambda h, w, t: fused_linear_kd_loss(h, w, teacher_logits=t, beta=1.5), "beta must be"),
    (lambda h, w, t: fused_linear_kd_loss(h, w, teacher_logits=t, num_items=0),
     "num_items must be an int >= 1"),
    (lambda h, w, t: fused_linear_kd_loss(h, w, teacher_logits=t, chunk_size=0),
     "chunk_size must be an int >= 1"),
])
def test_clear_errors(call, match):
    hidden, weight, teacher = randn(4, HIDDEN), randn(VOCAB, HIDDEN), randn(4, VOCAB)
    with pytest.raises(ValueError, match=match):
        call(hidden, weight, teacher)


def test_default_chunk_size_fits_the_budget():
    rows = default_chunk_size(4096, 128256, torch.float32)
    assert 1 <= rows < 4096
    assert rows * 128256 * 4 * LIVE_CHUNK_TENSORS <= CHUNK_BUDGET_BYTES
    assert default_chunk_size(3, 32000, torch.float32) == 3


def test_reference_softmax_kl_core_inside_the_chunks(monkeypatch):
    """With the ``"softmax_kl"`` core on its reference (KDFAST_BACKEND), the chunked sweep
    differentiates it per chunk and still matches."""
    monkeypatch.setenv("KDFAST_BACKEND", "reference")
    options = {"labels": token_labels(), "hard_weight": 0.5, "divergence": "jsd"}
    assert_matches_reference(loss_fn(native(), **options), loss_fn(fused_linear_kd, **options),
                             problem())
