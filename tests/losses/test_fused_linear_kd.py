"""fused_linear_kd_loss: the chunked native sweep against the eager reference, every teacher
form and divergence, and the reference against the formulas written out here."""

from __future__ import annotations

import pytest
import torch

import kdfast
from kdfast.losses.fused_linear_kd import fused_linear_kd_loss
from kdfast.ops.fused_linear_kd import (
    CHUNK_BUDGET_BYTES,
    LIVE_CHUNK_TENSORS,
    MIN_CHUNK_ROWS,
    default_chunk_size,
)
from kdfast.reference.fused_linear_kd import TOPK_TAILS, divergence_rows, fused_linear_kd
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


def problem(dtype=torch.float64, teacher_form="hidden", bias=True, scale=1.0, tokens=TOKENS,
            teacher_vocab=VOCAB):
    """[student hidden, weight, (bias)] requiring grad, then the teacher tensors (for
    ``"topk"`` the full teacher logits, which :func:`topk_of` cuts)."""
    student = [randn(tokens, HIDDEN, seed=0, dtype=dtype, requires_grad=True),
               (scale * randn(VOCAB, HIDDEN, seed=1)).to(dtype).requires_grad_()]
    if bias:
        student.append(randn(VOCAB, seed=2, dtype=dtype, requires_grad=True))
    if teacher_form in ("logits", "topk"):
        teacher = [(scale * randn(tokens, teacher_vocab, seed=4)).to(dtype)]
    else:
        teacher = [randn(tokens, TEACHER_HIDDEN, seed=5, dtype=dtype),
                   (scale * randn(teacher_vocab, TEACHER_HIDDEN, seed=6)).to(dtype),
                   randn(teacher_vocab, seed=7, dtype=dtype)]
    return student + teacher


def topk_of(teacher_logits: torch.Tensor, k: int, log_probs: bool = True):
    """(values, indices) of the k largest, values as log-probabilities or raw logits."""
    source = torch.log_softmax(teacher_logits, dim=-1) if log_probs else teacher_logits
    return source.topk(k, dim=-1)


def loss_fn(function, teacher_form="hidden", bias=True, k=None, **options):
    """``function(*tensors)`` for the tensors of :func:`problem` (labels and options bound;
    for ``"topk"`` the teacher's top ``k`` log-probabilities, their ids fixed here)."""
    def call(*tensors):
        if bias:
            hidden, weight, student_bias, *teacher = tensors
        else:
            (hidden, weight, *teacher), student_bias = tensors, None
        if teacher_form == "topk":
            values, indices = topk_of(teacher[0].detach().double(), k)
            teacher_args = {"teacher_topk": (values.to(teacher[0].dtype), indices)}
        elif teacher_form == "logits":
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


@pytest.mark.parametrize("divergence", ("jsd", "skew_forward", "skew_reverse", "tv"))
def test_logits_at_1e4_stay_finite_and_match(divergence):
    options = {"labels": token_labels(), "hard_weight": 0.5, "divergence": divergence}
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


def test_default_chunk_size_fits_the_budget_above_the_minimum_rows():
    rows = default_chunk_size(4096, 8000, torch.float32)
    assert MIN_CHUNK_ROWS < rows < 4096
    assert rows * 8000 * 4 * LIVE_CHUNK_TENSORS <= CHUNK_BUDGET_BYTES
    assert default_chunk_size(4096, 128256, torch.float32) == MIN_CHUNK_ROWS
    assert default_chunk_size(3, 32000, torch.float32) == 3


def test_reference_softmax_kl_core_inside_the_chunks(monkeypatch):
    """With the ``"softmax_kl"`` core on its reference (KDFAST_BACKEND), the chunked sweep
    differentiates it per chunk and still matches."""
    monkeypatch.setenv("KDFAST_BACKEND", "reference")
    options = {"labels": token_labels(), "hard_weight": 0.5, "divergence": "jsd"}
    assert_matches_reference(loss_fn(native(), **options), loss_fn(fused_linear_kd, **options),
                             problem())


# --- skew KL, skew reverse KL, total variation -----------------------------------------

NEW_DIVERGENCES = (("skew_forward", 0.1), ("skew_forward", 0.6), ("skew_forward", 0.0),
                   ("skew_reverse", 0.1), ("skew_reverse", 0.0), ("tv", 0.1))


@pytest.mark.parametrize("divergence,alpha", NEW_DIVERGENCES)
@pytest.mark.parametrize("teacher_form", TEACHER_FORMS)
@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_skew_and_tv_match_reference_float64(divergence, alpha, teacher_form, reduction):
    options = {"labels": token_labels(), "divergence": divergence, "alpha": alpha,
               "temperature": 2.0, "soft_weight": 0.7, "hard_weight": 0.4,
               "reduction": reduction}
    assert_matches_reference(loss_fn(native(), teacher_form, **options),
                             loss_fn(fused_linear_kd, teacher_form, **options),
                             problem(teacher_form=teacher_form), what=divergence)


def test_reference_divergences_are_the_formulas():
    """The reference's skew KLs and TV against the definitions written out on probabilities."""
    student, teacher = randn(5, 11, seed=0), randn(5, 11, seed=1)
    temperature, alpha = 1.7, 0.3
    q = torch.softmax(student / temperature, 1)
    p = torch.softmax(teacher / temperature, 1)

    def kl(a, b):
        return (a * (a / b).log()).sum(1)
    want = {"skew_forward": kl(p, alpha * p + (1 - alpha) * q),
            "skew_reverse": kl(q, alpha * q + (1 - alpha) * p),
            "tv": 0.5 * (p - q).abs().sum(1)}
    for divergence, value in want.items():
        got = divergence_rows(student, teacher, temperature, divergence, alpha=alpha)
        assert_rel_close(got, temperature**2 * value, 1e-12, divergence)
    assert_rel_close(divergence_rows(student, teacher, temperature, "skew_forward", alpha=0.0),
                     temperature**2 * kl(p, q), 1e-12, "alpha = 0 is KL")


@pytest.mark.parametrize("divergence,beta", DIVERGENCES + (("jsd", 1.0),))
def test_torch_chunk_formula_matches_for_the_core_divergences(divergence, beta, monkeypatch):
    """With the ``"softmax_kl"`` core on its reference, forward KL, reverse KL and the JSD go
    through the chunk's torch formula (torch_divergence) and still match."""
    monkeypatch.setenv("KDFAST_BACKEND", "reference")
    options = {"labels": token_labels(), "hard_weight": 0.5, "divergence": divergence,
               "beta": beta, "temperature": 1.5}
    assert_matches_reference(loss_fn(native(), **options), loss_fn(fused_linear_kd, **options),
                             problem())


# --- top-k teachers ----------------------------------------------------------------------

TOPK_CASES = [(tail, k) for tail in TOPK_TAILS for k in (1, 7, VOCAB)]


@pytest.mark.parametrize("topk_tail,k", TOPK_CASES)
@pytest.mark.parametrize("divergence,beta,alpha", [("forward", 0.5, 0.1),
                                                   ("reverse", 0.5, 0.1),
                                                   ("jsd", 0.3, 0.1),
                                                   ("skew_forward", 0.5, 0.2),
                                                   ("skew_reverse", 0.5, 0.2),
                                                   ("tv", 0.5, 0.1)])
def test_topk_matches_reference_float64(topk_tail, k, divergence, beta, alpha):
    options = {"labels": token_labels(), "divergence": divergence, "beta": beta,
               "alpha": alpha, "temperature": 2.0, "soft_weight": 0.7, "hard_weight": 0.4,
               "topk_tail": topk_tail}
    assert_matches_reference(loss_fn(native(), "topk", k=k, **options),
                             loss_fn(fused_linear_kd, "topk", k=k, **options),
                             problem(teacher_form="topk"), what=f"{topk_tail} k={k}")


@pytest.mark.parametrize("topk_tail", TOPK_TAILS)
@pytest.mark.parametrize("divergence", ("forward", "reverse", "tv"))
def test_topk_with_every_id_equals_the_full_teacher(topk_tail, divergence):
    """k = V: both treatments are the full divergence (nothing outside the ids)."""
    tensors = problem(teacher_form="logits")
    options = {"labels": token_labels(), "divergence": divergence, "temperature": 2.0,
               "topk_tail": topk_tail}
    got = loss_fn(native(), "topk", k=VOCAB, **options)(*tensors)
    want = loss_fn(native(), "logits", **options)(*tensors)
    assert_rel_close(got, want, 1e-12, topk_tail)


def test_topk_with_one_id_renormalized_is_zero():
    tensors = problem(teacher_form="topk")
    loss = loss_fn(native(), "topk", k=1, topk_tail="renormalize")(*tensors)
    grads = torch.autograd.grad(loss, tensors[:3])
    assert loss.abs() < 1e-15 and all(g.abs().max() < 1e-15 for g in grads)


def test_reference_topk_treatments_are_the_formulas():
    """Written out at T = 1 (bucket) and T = 2 (renormalize) on probabilities."""
    student, teacher, k = randn(6, 13, seed=0), randn(6, 13, seed=1), 4
    hidden, weight = student, torch.eye(13, dtype=torch.float64)  # logits = student
    log_p = torch.log_softmax(teacher, 1)
    values, indices = log_p.topk(k, dim=1)
    q = torch.softmax(student, 1)
    p_k, q_k = values.exp(), q.gather(1, indices)
    coarse_p = torch.cat([p_k, 1 - p_k.sum(1, keepdim=True)], 1)
    coarse_q = torch.cat([q_k, 1 - q_k.sum(1, keepdim=True)], 1)
    bucket = (coarse_p * (coarse_p / coarse_q).log()).sum(1)
    got = fused_linear_kd(hidden, weight, teacher_topk=(values, indices), topk_tail="bucket",
                          reduction="none")
    assert_rel_close(got, bucket, 1e-12, "bucket")
    renorm_p = torch.softmax(values / 2.0, 1)
    renorm_q = torch.softmax(student.gather(1, indices) / 2.0, 1)
    renorm = 4.0 * (renorm_p * (renorm_p / renorm_q).log()).sum(1)
    got = fused_linear_kd(hidden, weight, teacher_topk=(values, indices), temperature=2.0,
                          reduction="none")
    assert_rel_close(got, renorm, 1e-12, "renormalize")


def test_topk_renormalize_takes_raw_logits_and_log_probabilities_alike():
    tensors = problem(teacher_form="topk")
    teacher = tensors[3]
    results = []
    for log_probs in (True, False):
        values, indices = topk_of(teacher, 5, log_probs)
        results.append(fused_linear_kd_loss(*tensors[:2], student_bias=tensors[2],
                                            teacher_topk=(values, indices), temperature=3.0,
                                            backend="native", chunk_size=CHUNK))
    assert_rel_close(results[0], results[1], 1e-12)


def test_topk_sequence_shape_bfloat16():
    hidden = randn(2, 5, HIDDEN, seed=0, dtype=torch.bfloat16)
    weight = randn(VOCAB, HIDDEN, seed=1, dtype=torch.bfloat16)
    values, indices = topk_of(randn(2, 5, VOCAB, seed=2), 6)
    options = {"teacher_topk": (values.bfloat16(), indices), "topk_tail": "bucket",
               "reduction": "none"}
    got = fused_linear_kd_loss(hidden, weight, backend="native", **options)
    want = fused_linear_kd(hidden.double(), weight.double(),
                           teacher_topk=(values.bfloat16().double(), indices),
                           topk_tail="bucket", reduction="none")
    assert got.shape == (2, 5) and got.dtype == torch.float32
    assert_rel_close(got, want, 1e-5)


# --- logit_scale and softcap -------------------------------------------------------------

@pytest.mark.parametrize("teacher_form", (*TEACHER_FORMS, "topk"))
@pytest.mark.parametrize("divergence", ("forward", "skew_reverse"))
def test_softcap_and_logit_scale_match_reference_float64(teacher_form, divergence):
    options = {"labels": token_labels(), "hard_weight": 0.4, "temperature": 1.5,
               "divergence": divergence, "logit_scale": 1.7, "softcap": 3.0}
    if teacher_form == "hidden":
        options.update(teacher_logit_scale=0.6, teacher_softcap=2.5)
    k = 9 if teacher_form == "topk" else None
    tensors = problem(teacher_form=teacher_form, scale=2.0)
    assert (tensors[0] @ tensors[1].T).abs().max() * 1.7 > 3 * 3.0  # the cap bites
    assert_matches_reference(loss_fn(native(), teacher_form, k=k, **options),
                             loss_fn(fused_linear_kd, teacher_form, k=k, **options), tensors)


def test_softcap_is_gemma_capping():
    hidden, weight = randn(4, HIDDEN, seed=0), randn(VOCAB, HIDDEN, seed=1)
    teacher = randn(4, VOCAB, seed=2)
    logits = 30.0 * torch.tanh(2.0 * (hidden @ weight.T) / 30.0)
    got = fused_linear_kd_loss(hidden, weight, teacher_logits=teacher, logit_scale=2.0,
                               softcap=30.0, reduction="none")
    want = fused_linear_kd_loss(logits, torch.eye(VOCAB, dtype=torch.float64),
                                teacher_logits=teacher, reduction="none")
    assert_rel_close(got, want, 1e-12)


# --- vocabularies of different sizes ---------------------------------------------------

@pytest.mark.parametrize("teacher_vocab,divergence,beta,alpha", [
    (VOCAB + 6, "reverse", 0.5, 0.1), (VOCAB + 6, "jsd", 0.4, 0.1),
    (VOCAB + 6, "skew_forward", 0.5, 0.3), (VOCAB + 6, "tv", 0.5, 0.1),
    (VOCAB - 6, "forward", 0.5, 0.1), (VOCAB - 6, "jsd", 0.4, 0.1),
    (VOCAB - 6, "skew_reverse", 0.5, 0.3), (VOCAB - 6, "tv", 0.5, 0.1)])
@pytest.mark.parametrize("teacher_form", TEACHER_FORMS)
def test_different_vocabularies_match_reference_float64(teacher_vocab, divergence, beta, alpha,
                                                       teacher_form):
    options = {"labels": token_labels(), "hard_weight": 0.3, "temperature": 2.0,
               "divergence": divergence, "beta": beta, "alpha": alpha}
    tensors = problem(teacher_form=teacher_form, teacher_vocab=teacher_vocab)
    got = assert_matches_reference(loss_fn(native(), teacher_form, **options),
                                   loss_fn(fused_linear_kd, teacher_form, **options), tensors)
    assert torch.isfinite(got[0])


def test_teacher_lacking_ids_is_forward_kl_over_its_own():
    """Padded with −inf, not 0: the student's mass on ids the teacher lacks is only seen
    through its normaliser, KL = Σ_{v < V_t} p_v (log p_v − log q_v)."""
    hidden, weight = randn(5, HIDDEN, seed=0), randn(VOCAB, HIDDEN, seed=1)
    teacher = randn(5, VOCAB - 10, seed=2)
    log_q = torch.log_softmax(hidden @ weight.T, 1)[:, :VOCAB - 10]
    log_p = torch.log_softmax(teacher, 1)
    want = (log_p.exp() * (log_p - log_q)).sum(1)
    for backend in ("native", "reference"):
        got = fused_linear_kd_loss(hidden, weight, teacher_logits=teacher, reduction="none",
                                   backend=backend)
        assert_rel_close(got, want, 1e-12, backend)


# --- torch.compile(fullgraph=True) -----------------------------------------------------

def compile_case(function):
    torch._dynamo.reset()
    return torch.compile(function, fullgraph=True, backend="aot_eager")


@pytest.mark.parametrize("teacher_form,options", [
    ("hidden", {"hard_weight": 0.5, "softcap": 4.0}),
    ("logits", {"divergence": "tv", "reduction": "none"}),
    ("topk", {"topk_tail": "bucket", "divergence": "skew_forward"}),
    ("logits", {"num_items": torch.tensor(40)}),
])
def test_fullgraph_compile_matches_eager(teacher_form, options):
    options = {"labels": token_labels(), "temperature": 2.0, **options}
    k = 5 if teacher_form == "topk" else None
    eager = loss_fn(native(), teacher_form, k=k, **options)
    compiled = compile_case(eager)
    runs = []
    for function in (eager, compiled):
        tensors = problem(teacher_form=teacher_form)
        loss = function(*tensors)
        runs.append([loss, *torch.autograd.grad(loss.sum(), tensors[:3])])
    for got, want in zip(runs[1], runs[0], strict=True):
        assert_rel_close(got, want, 1e-12)


def test_ignored_rows_contribute_nothing_under_compile():
    """NaN hidden states and teacher logits at ignored tokens: the compiled loss is the
    kept tokens' loss, finite, and the ignored rows' gradient is exactly 0."""
    labels = token_labels()
    ignored = labels == -100
    tensors = problem(teacher_form="logits")
    poisoned = [tensors[0].detach().clone(), *tensors[1:]]
    poisoned[0][ignored] = float("nan")
    poisoned[3] = tensors[3].clone()
    poisoned[3][ignored] = float("nan")
    poisoned[0].requires_grad_()
    compiled = compile_case(loss_fn(native(), "logits", labels=labels, hard_weight=0.5))
    loss = compiled(*poisoned)
    (grad,) = torch.autograd.grad(loss, poisoned[0])
    kept = ~ignored
    want = loss_fn(fused_linear_kd, "logits", labels=labels[kept], hard_weight=0.5)(
        tensors[0][kept], *tensors[1:3], tensors[3][kept])
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert_rel_close(loss, want, 1e-12)
    assert torch.equal(grad[ignored], torch.zeros_like(grad[ignored]))


def test_all_masked_batch_under_compile_is_zero():
    tensors = problem()
    compiled = compile_case(loss_fn(native(), labels=torch.full((TOKENS,), -100),
                                    hard_weight=1.0))
    loss = compiled(*tensors)
    grads = torch.autograd.grad(loss, tensors[:3])
    assert torch.equal(loss, torch.zeros_like(loss))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


# --- a frozen teacher, tied weights ----------------------------------------------------

@pytest.mark.parametrize("requires_grad", (False, True))
def test_teacher_hidden_and_weight_stay_frozen(requires_grad):
    tensors = problem()
    teacher = [x.detach().clone().requires_grad_(requires_grad) for x in tensors[3:]]
    before = [x.detach().clone() for x in teacher]
    loss = loss_fn(native(), labels=token_labels(), hard_weight=0.5)(*tensors[:3], *teacher)
    if requires_grad:
        assert torch.autograd.grad(loss, teacher, allow_unused=True, retain_graph=True) == \
            (None, None, None)
    loss.backward()
    for x, old in zip(teacher, before, strict=True):
        assert x.requires_grad == requires_grad and x.grad is None and torch.equal(x, old)
    assert tensors[0].grad is not None


def test_tied_embedding_parameter_accumulates():
    """An nn.Embedding and the lm_head share one Parameter: .grad gets both uses, and two
    backward passes add up."""
    results = []
    for function in (native(), fused_linear_kd):
        torch.manual_seed(0)
        embedding = torch.nn.Embedding(VOCAB, HIDDEN, dtype=torch.float64)
        ids = torch.randint(0, VOCAB, (TOKENS,), generator=torch.Generator().manual_seed(9))
        teacher = randn(TOKENS, VOCAB, seed=10)
        for _ in range(2):
            hidden = torch.tanh(embedding(ids))
            function(hidden, embedding.weight, teacher_logits=teacher, labels=token_labels(),
                     hard_weight=0.3).backward()
        results.append(embedding.weight.grad)
    assert_rel_close(results[0], results[1], 1e-10, "tied weight")


@pytest.mark.parametrize("call,match", [
    (lambda h, w, t, topk: fused_linear_kd_loss(h, w, teacher_logits=t, teacher_topk=topk),
     "pass exactly one teacher"),
    (lambda h, w, t, topk: fused_linear_kd_loss(h, w, teacher_topk=(topk[0], topk[1] + VOCAB)),
     r"indices must be ids in \[0, 100\]"),
    (lambda h, w, t, topk: fused_linear_kd_loss(
        h, w, teacher_topk=(topk[0], topk[1][:, :1].expand(-1, 5).contiguous())),
     "repeat an id"),
    (lambda h, w, t, topk: fused_linear_kd_loss(h, w, teacher_topk=(topk[0], topk[1][:, :3])),
     "one shape"),
    (lambda h, w, t, topk: fused_linear_kd_loss(h, w, teacher_topk=(topk[0][:3], topk[1][:3])),
     "one row per token"),
    (lambda h, w, t, topk: fused_linear_kd_loss(h, w, teacher_topk=(topk[0] + 5.0, topk[1]),
                                                topk_tail="bucket"),
     "must be log-probabilities"),
    (lambda h, w, t, topk: fused_linear_kd_loss(h, w, teacher_topk=topk, teacher_bias=w[:, 0]),
     "teacher_bias go"),
    (lambda h, w, t, topk: fused_linear_kd_loss(h, w, teacher_logits=t, teacher_softcap=3.0),
     "teacher_softcap go"),
    (lambda h, w, t, topk: fused_linear_kd_loss(h, w, teacher_topk=topk, topk_tail="drop"),
     "topk_tail must be one of"),
    (lambda h, w, t, topk: fused_linear_kd_loss(h, w, teacher_logits=t, softcap=0.0),
     "softcap must be > 0"),
    (lambda h, w, t, topk: fused_linear_kd_loss(h, w, teacher_logits=t, logit_scale=-1.0),
     "logit_scale must be > 0"),
    (lambda h, w, t, topk: fused_linear_kd_loss(h, w, teacher_logits=t, alpha=1.0),
     r"alpha must be in \[0, 1\)"),
    (lambda h, w, t, topk: fused_linear_kd_loss(h, w[:3], teacher_topk=topk), "k = 5 ids"),
])
def test_topk_and_option_errors(call, match):
    hidden, weight, teacher = randn(4, HIDDEN), randn(VOCAB, HIDDEN), randn(4, VOCAB)
    with pytest.raises(ValueError, match=match):
        call(hidden, weight, teacher, topk_of(teacher, 5))


def test_topk_bad_types():
    hidden, weight, teacher = randn(4, HIDDEN), randn(VOCAB, HIDDEN), randn(4, VOCAB)
    values, indices = topk_of(teacher, 5)
    with pytest.raises(TypeError, match="integer tensor of vocabulary ids"):
        fused_linear_kd_loss(hidden, weight, teacher_topk=(values, indices.double()))
    with pytest.raises(TypeError, match="must be a pair"):
        fused_linear_kd_loss(hidden, weight, teacher_topk=values)


def test_compiled_module_follows_a_temperature_schedule():
    """A changed float option recompiles with a symbolic float: it must reach the op."""
    criterion = kdfast.FusedLinearKDLoss(temperature=4.0, hard_weight=0.5, chunk_size=CHUNK)
    compiled = compile_case(criterion)
    tensors = problem(teacher_form="logits")
    for temperature in (4.0, 2.0, 1.0):
        criterion.temperature = temperature
        got = compiled(*tensors[:2], teacher_logits=tensors[3], labels=token_labels())
        want = fused_linear_kd(*tensors[:2], teacher_logits=tensors[3], labels=token_labels(),
                               temperature=temperature, hard_weight=0.5)
        assert_rel_close(got, want, 1e-12, f"T={temperature}")


def test_inductor_compile_matches_eager():
    """One run through Inductor's code generation (about 15 s on the 2-core machine)."""
    torch._dynamo.reset()
    options = {"labels": token_labels(), "hard_weight": 0.5, "softcap": 3.0,
               "num_items": torch.tensor(30)}
    eager = loss_fn(native(), "logits", **options)
    runs = []
    for function in (eager, torch.compile(eager, fullgraph=True)):
        tensors = problem(teacher_form="logits")
        loss = function(*tensors)
        runs.append([loss, *torch.autograd.grad(loss, tensors[:3])])
    for got, want in zip(runs[1], runs[0], strict=True):
        assert_rel_close(got, want, 1e-12)


@pytest.mark.parametrize("topk_tail", TOPK_TAILS)
def test_topk_per_token_grad_output_reruns_the_sweep(topk_tail):
    options = {"labels": token_labels(), "hard_weight": 0.5, "reduction": "none",
               "topk_tail": topk_tail, "divergence": "jsd"}
    assert_matches_reference(loss_fn(native(), "topk", k=6, **options),
                             loss_fn(fused_linear_kd, "topk", k=6, **options),
                             problem(teacher_form="topk"),
                             grad_output=lambda value: torch.linspace(-2, 3, value.numel(),
                                                                      dtype=value.dtype))


def test_topk_second_derivatives_follow_the_reference():
    options = {"labels": token_labels(), "hard_weight": 0.5, "topk_tail": "bucket"}
    results = []
    for function in (native(), fused_linear_kd):
        tensors = problem(teacher_form="topk")
        loss = loss_fn(function, "topk", k=6, **options)(*tensors)
        (grad_hidden,) = torch.autograd.grad(loss, tensors[0], create_graph=True)
        results.append(torch.autograd.grad(grad_hidden.square().sum(), tensors[1]))
    assert_rel_close(results[0][0], results[1][0], 1e-10, "second derivative")


@pytest.mark.parametrize("teacher_form,options", [
    ("hidden", {"divergence": "skew_reverse", "softcap": 3.0, "teacher_softcap": 4.0}),
    ("logits", {"divergence": "tv"}),
    ("topk", {"topk_tail": "renormalize", "divergence": "skew_forward"}),
])
def test_bfloat16_new_options_accumulate_in_float32(teacher_form, options):
    options = {"labels": token_labels(), "hard_weight": 0.5, "temperature": 2.0, **options}
    k = 6 if teacher_form == "topk" else None
    got = assert_matches_reference(loss_fn(native(), teacher_form, k=k, **options),
                                   loss_fn(fused_linear_kd, teacher_form, k=k, **options),
                                   problem(torch.bfloat16, teacher_form))
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16


def test_default_chunks_are_smaller_where_the_chunk_holds_more():
    from kdfast.ops.fused_linear_kd import FusedLinearKDOptions, live_chunk_tensors
    core = live_chunk_tensors(FusedLinearKDOptions())
    assert core == LIVE_CHUNK_TENSORS
    assert live_chunk_tensors(FusedLinearKDOptions(divergence="tv")) > core
    assert live_chunk_tensors(FusedLinearKDOptions(topk_tail="bucket", softcap=30.0)) > core
    assert default_chunk_size(4096, 8000, torch.float32, 10) < \
        default_chunk_size(4096, 8000, torch.float32)


def test_module_takes_and_checks_the_new_options():
    criterion = kdfast.FusedLinearKDLoss(divergence="skew_reverse", alpha=0.2,
                                         topk_tail="bucket", softcap=3.0, chunk_size=CHUNK)
    tensors = problem(teacher_form="topk")
    values, indices = topk_of(tensors[3], 6)
    got = criterion(*tensors[:2], student_bias=tensors[2], teacher_topk=(values, indices))
    want = fused_linear_kd(*tensors[:2], student_bias=tensors[2],
                           teacher_topk=(values, indices), divergence="skew_reverse",
                           alpha=0.2, topk_tail="bucket", softcap=3.0)
    assert_rel_close(got, want, 1e-12)
    with pytest.raises(ValueError, match="softcap must be > 0"):
        criterion.softcap = -1.0
    with pytest.raises(ValueError, match="topk_tail must be one of"):
        criterion.topk_tail = "tail"


@pytest.mark.parametrize("scale_by_temperature_squared", (True, False))
@pytest.mark.parametrize("divergence,beta", (("forward", 0.5), ("jsd", 0.3), ("tv", 0.5)))
@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_temperature_squared_switch_matches_reference_float64(scale_by_temperature_squared,
                                                              divergence, beta, reduction):
    options = {"labels": token_labels(), "divergence": divergence, "beta": beta,
               "temperature": 3.0, "soft_weight": 0.7, "hard_weight": 0.4,
               "reduction": reduction,
               "scale_by_temperature_squared": scale_by_temperature_squared}
    assert_matches_reference(loss_fn(native(), **options), loss_fn(fused_linear_kd, **options),
                             problem(), what=divergence)


def test_temperature_squared_switch_divides_only_the_soft_term():
    """Without T², ℓ = w_soft·D + w_hard·CE: the soft part of the default loss over T², the
    cross-entropy untouched (checked on the reference, which the native path matches)."""
    tensors, temperature = problem(), 3.0

    def loss(scale, soft_weight, hard_weight):
        return loss_fn(fused_linear_kd, labels=token_labels(), temperature=temperature,
                       soft_weight=soft_weight, hard_weight=hard_weight,
                       scale_by_temperature_squared=scale)(*tensors)
    soft, hard = loss(True, 0.7, 0.0), loss(True, 0.0, 0.4)
    assert_rel_close(loss(False, 0.7, 0.4), soft / temperature**2 + hard, 1e-13)
    assert not torch.allclose(loss(False, 0.7, 0.0), soft)
    criterion = kdfast.FusedLinearKDLoss(temperature=temperature, chunk_size=CHUNK,
                                         scale_by_temperature_squared=False)
    got = criterion(*tensors[:2], student_bias=tensors[2], teacher_hidden=tensors[3],
                    teacher_weight=tensors[4], teacher_bias=tensors[5], labels=token_labels())
    assert_rel_close(got, loss(True, 1.0, 0.0) / temperature**2, 1e-12)
    with pytest.raises(TypeError, match="scale_by_temperature_squared must be True or False"):
        criterion.scale_by_temperature_squared = 1


LIGER_CASES = [("forward", 0.5, True, 0.0), ("reverse", 0.5, False, 0.4),
               ("jsd", 0.3, True, 0.4), ("jsd", 0.7, False, 0.0)]


@pytest.mark.parametrize("divergence,beta,scale_by_temperature_squared,hard_weight",
                         LIGER_CASES)
def test_equals_liger_kernel_fused_linear_jsd(divergence, beta, scale_by_temperature_squared,
                                              hard_weight):
    """kdfast and Liger-Kernel's LigerFusedLinearJSDLoss, as the benchmark's ``liger``
    provider configures it (kdfast/bench/peers.py), give the same loss and gradients.
    Liger accumulates the loss, and takes the cross-entropy's log-softmax, in fp32 whatever
    the inputs' dtype: hence the fp32-sized tolerance on float64 inputs."""
    pytest.importorskip("liger_kernel.chunked_loss",
                        reason="liger-kernel is not installed (optional: pip install "
                               "liger-kernel)")
    from dataclasses import replace

    from kdfast.bench.cores import CORES, lm_head_inputs
    from kdfast.bench.peers import liger_fused_linear_jsd
    from kdfast.bench.shapes import LmHeadShape

    core = replace(CORES["fused-linear-kd"], options={
        "divergence": divergence, "beta": beta, "temperature": 2.0, "soft_weight": 0.7,
        "hard_weight": hard_weight, "scale_by_temperature_squared": scale_by_temperature_squared})
    students, teachers = lm_head_inputs(LmHeadShape(TOKENS, HIDDEN, VOCAB), torch.float64, "cpu")
    liger = liger_fused_linear_jsd(core, students, teachers, compiled=False)
    want = liger(students, teachers)
    got = core.loss(students, teachers, "native")
    assert_rel_close(got, want.to(got.dtype), 1e-6, "loss")
    for name, g, w in zip(("d hidden", "d weight"), torch.autograd.grad(got, students),
                          torch.autograd.grad(want, students), strict=True):
        assert_rel_close(g, w, 1e-6, name)


@pytest.mark.parametrize("hard_weight", (0.0, 0.5))
def test_fwd_bwd_peak_is_three_chunks_and_two_weight_gradients(hard_weight):
    """CPU allocator peak of forward + backward with the kernel's divergence: the chunk's
    student logits, teacher logits and gradient (the cross-entropy's softmax reuses its
    log-softmax), and dL/dW twice (saved, and times grad_output); no (V, H) zeros for the
    gradient outputs' (absent) gradients."""
    if not hasattr(torch.ops.kdfast, "softmax_kl"):
        pytest.skip("the native extension is not built (the kernel's divergence)")
    from kdfast.bench.measure import cpu_peak_bytes
    tokens, hidden_size, vocab, chunk = 512, 32, 8000, 128
    hidden = randn(tokens, hidden_size, seed=0, dtype=torch.float32, requires_grad=True)
    weight = randn(vocab, hidden_size, seed=1, dtype=torch.float32, requires_grad=True)
    teacher = (randn(tokens, hidden_size, seed=2, dtype=torch.float32),
               randn(vocab, hidden_size, seed=3, dtype=torch.float32))
    labels = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(4))

    def step():
        loss = fused_linear_kd_loss(hidden, weight, *teacher, labels=labels, chunk_size=chunk,
                                    hard_weight=hard_weight, backend="native")
        return torch.autograd.grad(loss, (hidden, weight))
    step()
    chunk_bytes, weight_bytes = chunk * vocab * 4, vocab * hidden_size * 4
    peak = cpu_peak_bytes(step)
    assert peak <= 3.25 * chunk_bytes + 2 * weight_bytes + 2 * tokens * hidden_size * 4, \
        (peak / chunk_bytes, weight_bytes / chunk_bytes)
