import pytest
import torch
import torch.nn.functional as F

from kdfast import backends
from kdfast.functional import nst_loss
from kdfast.reference.nst import channel_mmd
from tests.helpers import REDUCTIONS, assert_rel_close, randn, spy_on_backend


def fused_backends(*tensors):
    """The backends other than the reference that can run ``tensors`` here."""
    return [name for name, impl in backends.implementations("channel_mmd").items()
            if name != "reference" and impl.supports(*tensors) is None]


def repdistiller_nst(f_s, f_t):
    """RepDistiller's NSTLoss.nst_loss (square maps): normalise over HW, poly d=2 c=0, and
    means over B·C·C (equal to the batch mean of per-sample means)."""
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    f_s = F.normalize(f_s.view(f_s.shape[0], f_s.shape[1], -1), dim=2)
    f_t = F.normalize(f_t.view(f_t.shape[0], f_t.shape[1], -1), dim=2)

    def poly_kernel(a, b):
        return (a.unsqueeze(1) * b.unsqueeze(2)).sum(-1).pow(2)

    return (poly_kernel(f_t, f_t).mean().detach() + poly_kernel(f_s, f_s).mean()
            - 2 * poly_kernel(f_s, f_t).mean())


@pytest.mark.parametrize("shapes", [((4, 6, 8, 8), (4, 10, 4, 4)), ((3, 5, 4, 4), (3, 2, 4, 4))])
def test_default_equals_repdistiller(shapes):
    s = randn(*shapes[0], seed=0, requires_grad=True)
    t = randn(*shapes[1], seed=1)
    ours, theirs = nst_loss(s, t), repdistiller_nst(s, t)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(torch.autograd.grad(ours, s)[0], torch.autograd.grad(theirs, s)[0])


OPTIONS = [
    {},
    {"kernel": "linear", "unbiased": True},
    {"kernel": "poly", "degree": 3, "coef": 1.0, "teacher_term": False},
    {"kernel": "rbf", "sigma2": [0.5, 2.0]},
    {"kernel": "rbf", "sigma2": "mean", "unbiased": True},
]


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backends_agree_with_reference(monkeypatch, options, reduction):
    # Odd sizes, C_s != C_t, a pooled (2x) non-contiguous student, grad_output != 1.
    s = randn(3, 7, 6, 10, seed=2).transpose(2, 3).requires_grad_(True)
    t = randn(3, 5, 5, 3, seed=3, requires_grad=True)
    ref = nst_loss(s, t, reduction=reduction, backend="reference", **options)
    ref_grads = torch.autograd.grad(ref.sum() * 1.7, (s, t))
    names = fused_backends(s, t)
    if not names:
        pytest.skip("no fused channel_mmd backend runs CPU tensors here (native not built)")
    for name in names:
        calls = spy_on_backend(monkeypatch, "channel_mmd", name)
        out = nst_loss(s, t, reduction=reduction, backend=name, **options)
        assert len(calls) == 1, f"the {name} channel_mmd ran {len(calls)} times, not once"
        assert_rel_close(out, ref, 1e-12, f"{name} value")
        for got, want in zip(torch.autograd.grad(out.sum() * 1.7, (s, t)), ref_grads,
                             strict=True):
            assert_rel_close(got, want, 1e-12, f"{name} gradient")


def test_reductions_and_pooling():
    s, t = randn(3, 4, 8, 8, seed=4), randn(3, 6, 4, 4, seed=5)
    per_sample = channel_mmd(F.avg_pool2d(s, 2), t, sigma2=(1.0,))
    torch.testing.assert_close(nst_loss(s, t, reduction="none"), per_sample)
    torch.testing.assert_close(nst_loss(s, t, reduction="sum"), per_sample.sum())
    torch.testing.assert_close(nst_loss(s, t), per_sample.mean())
    # The teacher is pooled when it is the larger map.
    torch.testing.assert_close(nst_loss(t, s, reduction="none"),
                               channel_mmd(t, F.avg_pool2d(s, 2)))


def test_sigma2_forms():
    s, t = randn(2, 3, 4, 4, seed=6), randn(2, 5, 4, 4, seed=7)
    single = nst_loss(s, t, kernel="rbf", sigma2=2.0)
    torch.testing.assert_close(nst_loss(s, t, kernel="rbf", sigma2=[2.0]), single)
    torch.testing.assert_close(nst_loss(s, t, kernel="rbf", sigma2=(2,)), single)
    torch.testing.assert_close(nst_loss(s, t, kernel="rbf", sigma2=[2.0, 0.5]),
                               single + nst_loss(s, t, kernel="rbf", sigma2=0.5))
    assert not torch.allclose(nst_loss(s, t, kernel="rbf", sigma2="mean"), single)


@pytest.mark.parametrize("kernel", ["linear", "poly", "rbf"])
def test_teacher_term_changes_value_not_student_gradient(kernel):
    s = randn(2, 3, 4, 4, seed=8, requires_grad=True)
    t = randn(2, 5, 4, 4, seed=9)  # teacher without requires_grad
    kept = nst_loss(s, t, kernel=kernel)
    dropped = nst_loss(s, t, kernel=kernel, teacher_term=False)
    assert not torch.allclose(kept, dropped)
    torch.testing.assert_close(torch.autograd.grad(kept, s)[0],
                               torch.autograd.grad(dropped, s)[0])


def test_compiled_matches_eager():
    s, t = randn(2, 3, 4, 4, seed=12), randn(2, 5, 4, 4, seed=13)
    compiled = torch.compile(lambda a, b: nst_loss(a, b, kernel="rbf", sigma2="mean",
                                                   backend="reference"),
                             fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(s, t), nst_loss(s, t, kernel="rbf", sigma2="mean"))


def test_unbiased_needs_two_channels_per_set():
    s = randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="at least 2 student channels"):
        nst_loss(randn(2, 1, 4, 4), s, unbiased=True)
    with pytest.raises(ValueError, match="at least 2 teacher channels"):
        nst_loss(s, randn(2, 1, 4, 4), unbiased=True)
