import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from kdfast.reference.nst import (
    channel_mmd,
    mean_squared_distance,
    naive_channel_mmd,
    unit_channels,
)
from tests.helpers import randn

KERNEL_OPTIONS = [
    {"kernel": "linear"},
    {"kernel": "poly"},
    {"kernel": "poly", "degree": 3, "coef": 0.5},
    {"kernel": "poly", "degree": 1, "coef": 2.0},
    {"kernel": "rbf", "sigma2": (1.0,)},
    {"kernel": "rbf", "sigma2": (0.3, 2.0)},
]
# (student shape, teacher shape): D = 6 < m + n (poly d=2 uses D x D Grams), D = 12 > m + n
# (C x C Grams), B = 1 with a single student channel.
SHAPES = [((2, 3, 2, 3), (2, 4, 2, 3)), ((2, 2, 3, 4), (2, 5, 3, 4)), ((1, 1, 3, 3), (1, 2, 3, 3))]


def hand_case(width: int = 2):
    """x1 = [3, 4] -> [.6, .8], x2 = [0, 2] -> [0, 1]; y = [1, 0]; zero-padded to ``width``.

    Unit-row Grams: g(x1, x2) = .8, g(x1, y) = .6, g(x2, y) = 0, diagonals 1. Padding with
    zeros changes no Gram entry but switches poly d=2 between its D x D and C x C paths.
    """
    s = torch.zeros(1, 2, 1, width, dtype=torch.float64)
    s[0, 0, 0, :2] = torch.tensor([3.0, 4.0])
    s[0, 1, 0, :2] = torch.tensor([0.0, 2.0])
    t = torch.zeros(1, 1, 1, width, dtype=torch.float64)
    t[0, 0, 0, 0] = 1.0
    return s, t


RBF_HAND = (2 + 2 * math.exp(-0.2)) / 4 + 1 - (math.exp(-0.4) + math.exp(-1.0))


def assert_same_values_and_grads(out, ref, inputs):
    """Values, then gradients of a weighted sum (grad_output != 1, varying per sample)."""
    torch.testing.assert_close(out, ref)
    weights = torch.linspace(0.5, 2.0, out.numel(), dtype=out.dtype)
    got = torch.autograd.grad((out * weights).sum(), inputs)
    want = torch.autograd.grad((ref * weights).sum(), inputs)
    for g_out, g_ref in zip(got, want, strict=True):
        assert torch.isfinite(g_out).all()
        torch.testing.assert_close(g_out, g_ref)


@pytest.mark.parametrize("width", [2, 4])
@pytest.mark.parametrize("options,expected", [
    ({"kernel": "linear"}, 0.9 + 1 - 2 * 0.3),                       # = ||[.3,.9]-[1,0]||^2
    ({"kernel": "poly"}, (2 + 2 * 0.64) / 4 + 1 - 2 * 0.36 / 2),
    ({"kernel": "poly", "coef": 1.0}, (8 + 2 * 3.24) / 4 + 4 - 2 * (2.56 + 1) / 2),
    ({"kernel": "poly", "degree": 3}, (2 + 2 * 0.512) / 4 + 1 - 2 * 0.216 / 2),
    ({"kernel": "rbf", "sigma2": (1.0,)}, RBF_HAND),
    ({"kernel": "rbf", "sigma2": (1.0,), "teacher_term": False}, RBF_HAND - 1),
], ids=["linear", "poly2", "poly2-c1", "poly3", "rbf", "rbf-no-teacher-term"])
def test_hand_computed(width, options, expected):
    s, t = hand_case(width)
    torch.testing.assert_close(channel_mmd(s, t, **options),
                               torch.tensor([expected], dtype=torch.float64))


def test_hand_computed_mean_bandwidth():
    # Pooled rows x1, x2, y: squared distances .4, .8, 2 -> mean 3.2 / 3.
    s, t = hand_case()
    x_hat, y_hat = unit_channels(s), unit_channels(t)
    torch.testing.assert_close(mean_squared_distance(x_hat, y_hat),
                               torch.tensor([3.2 / 3], dtype=torch.float64))
    sigma2 = 3.2 / 3
    k = [math.exp(-d / (2 * sigma2)) for d in (0.4, 0.8, 2.0)]
    expected = (2 + 2 * k[0]) / 4 + 1 - (k[1] + k[2])
    torch.testing.assert_close(channel_mmd(s, t, kernel="rbf", sigma2="mean"),
                               torch.tensor([expected], dtype=torch.float64))


def test_hand_computed_unbiased_linear():
    # Teacher y1 = [1, 0], y2 = [0, -5] -> [0, -1]: within-teacher off-diagonal g = 0,
    # student off-diagonal g = .8, cross g = .6, -.8, 0, -1 (mean -.3).
    s, _ = hand_case()
    t = torch.tensor([[[[1.0, 0.0]], [[0.0, -5.0]]]], dtype=torch.float64)
    torch.testing.assert_close(channel_mmd(s, t, kernel="linear", unbiased=True),
                               torch.tensor([0.8 + 0.0 + 0.6], dtype=torch.float64))


# Unbiased needs two student channels: the 1-channel shape runs biased only.
ESTIMATORS = [(shapes, unbiased, teacher_term) for shapes in SHAPES
              for unbiased in (False, True) for teacher_term in (True, False)
              if not (unbiased and shapes[0][1] < 2)]


@pytest.mark.parametrize("shapes,unbiased,teacher_term", ESTIMATORS)
@pytest.mark.parametrize("options", KERNEL_OPTIONS + [{"kernel": "rbf", "sigma2": "mean"}])
def test_matches_brute_force_definition(shapes, unbiased, teacher_term, options):
    s = randn(*shapes[0], seed=0, requires_grad=True)
    t = randn(*shapes[1], seed=1, requires_grad=True)
    kwargs = dict(options, unbiased=unbiased, teacher_term=teacher_term)
    assert_same_values_and_grads(channel_mmd(s, t, **kwargs), naive_channel_mmd(s, t, **kwargs),
                                 (s, t))


@pytest.mark.parametrize("shapes", SHAPES[:2])
def test_poly2_equals_gram_frobenius_form(shapes):
    s, t = randn(*shapes[0], seed=2), randn(*shapes[1], seed=3)
    x_hat, y_hat = unit_channels(s), unit_channels(t)
    m, n = x_hat.shape[1], y_hat.shape[1]
    diff = x_hat.transpose(1, 2) @ x_hat / m - y_hat.transpose(1, 2) @ y_hat / n
    torch.testing.assert_close(channel_mmd(s, t), diff.pow(2).sum((1, 2)))


@pytest.mark.parametrize("shapes", SHAPES)
def test_linear_equals_mean_difference_form(shapes):
    s, t = randn(*shapes[0], seed=4), randn(*shapes[1], seed=5)
    diff = unit_channels(s).mean(1) - unit_channels(t).mean(1)
    torch.testing.assert_close(channel_mmd(s, t, kernel="linear"), diff.pow(2).sum(1))


@pytest.mark.parametrize("options", KERNEL_OPTIONS + [{"kernel": "rbf", "sigma2": "mean"}])
def test_same_channel_distribution_gives_zero(options):
    f = randn(2, 3, 3, 4, seed=6)
    zero = torch.zeros(2, dtype=torch.float64)
    torch.testing.assert_close(channel_mmd(f, f.clone(), **options), zero)
    # Positive per-channel scales and repeating every channel keep the normalised
    # distribution, so the biased MMD stays 0 (with C_s != C_t).
    scaled = f * torch.tensor([2.0, 0.5, 3.0], dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(channel_mmd(f, torch.cat([scaled, f], 1), **options), zero)
    assert (channel_mmd(f, randn(2, 3, 3, 4, seed=7), **options) > 1e-6).all()


def test_rbf_sigma_list_is_sum_of_single_kernels():
    s, t = randn(2, 3, 2, 4, seed=8), randn(2, 5, 2, 4, seed=9)
    torch.testing.assert_close(
        channel_mmd(s, t, kernel="rbf", sigma2=(0.5, 2.0, 7.0)),
        sum(channel_mmd(s, t, kernel="rbf", sigma2=(v,)) for v in (0.5, 2.0, 7.0)))


@pytest.mark.parametrize("options,diagonal", [
    ({"kernel": "rbf", "sigma2": (0.7,)}, 1.0),
    ({"kernel": "poly", "degree": 3, "coef": 0.5}, 1.5**3),
    ({"kernel": "poly"}, 1.0),
])
def test_unbiased_versus_biased(options, diagonal):
    """m^2 B_ss = m(m-1) U_ss + m k(x, x), each within-set term isolated via teacher_term."""
    s, t = randn(2, 3, 2, 3, seed=10), randn(2, 4, 2, 3, seed=11)
    m, n = 3, 4

    def teacher_term(a, b, unbiased):
        return (channel_mmd(a, b, unbiased=unbiased, **options)
                - channel_mmd(a, b, unbiased=unbiased, teacher_term=False, **options))

    tt_b, tt_u = teacher_term(s, t, False), teacher_term(s, t, True)
    ss_b, ss_u = teacher_term(t, s, False), teacher_term(t, s, True)
    torch.testing.assert_close(n * n * tt_b, n * (n - 1) * tt_u + n * diagonal)
    torch.testing.assert_close(m * m * ss_b, m * (m - 1) * ss_u + m * diagonal)
    gap = channel_mmd(s, t, **options) - channel_mmd(s, t, unbiased=True, **options)
    torch.testing.assert_close(gap, (ss_b - ss_u) + (tt_b - tt_u))


@pytest.mark.parametrize("shapes", SHAPES[:2])
@pytest.mark.parametrize("options", KERNEL_OPTIONS)
@pytest.mark.parametrize("unbiased,teacher_term", [(False, True), (True, True), (True, False),
                                                   (False, False)])
def test_gradcheck(shapes, options, unbiased, teacher_term):
    s = randn(*shapes[0], seed=12, requires_grad=True)
    t = randn(*shapes[1], seed=13, requires_grad=True)
    kwargs = dict(options, unbiased=unbiased, teacher_term=teacher_term)
    assert torch.autograd.gradcheck(lambda a, b: channel_mmd(a, b, **kwargs), (s, t))


def test_mean_bandwidth_is_detached_and_matches_brute_force():
    s = randn(1, 3, 2, 3, seed=14, requires_grad=True)
    t = randn(1, 4, 2, 3, seed=15, requires_grad=True)
    z = torch.cat([unit_channels(s), unit_channels(t)], 1)[0]
    brute = (z.unsqueeze(0) - z.unsqueeze(1)).pow(2).sum(-1).sum() / (7 * 6)
    value = mean_squared_distance(unit_channels(s), unit_channels(t))
    assert not value.requires_grad
    torch.testing.assert_close(value, brute.detach().view(1))
    # The gradient treats sigma2 as a constant: the same as passing that number.
    out = channel_mmd(s, t, kernel="rbf", sigma2="mean")
    fixed = channel_mmd(s, t, kernel="rbf", sigma2=(value.item(),))
    assert_same_values_and_grads(out, fixed, (s, t))


@pytest.mark.parametrize("width", [2, 8])
@pytest.mark.parametrize("options", KERNEL_OPTIONS + [{"kernel": "rbf", "sigma2": "mean"}])
@pytest.mark.parametrize("unbiased", [False, True])
def test_all_zero_channel_follows_the_definition(width, options, unbiased):
    s = randn(2, 3, 2, width, seed=16)
    t = randn(2, 4, 2, width, seed=17)
    s[:, 1] = 0
    t[0, 2] = 0
    s.requires_grad_(True)
    t.requires_grad_(True)
    out = channel_mmd(s, t, unbiased=unbiased, **options)
    ref = naive_channel_mmd(s, t, unbiased=unbiased, **options)
    assert torch.isfinite(out).all()
    assert_same_values_and_grads(out, ref, (s, t))


def test_all_channels_identical_mean_bandwidth_stays_finite():
    f = torch.ones(2, 3, 2, 2, dtype=torch.float64)
    out = channel_mmd(f, torch.zeros(2, 2, 2, 2, dtype=torch.float64) + 5, kernel="rbf",
                      sigma2="mean")
    torch.testing.assert_close(out, torch.zeros(2, dtype=torch.float64))
    dead = channel_mmd(torch.zeros(1, 2, 2, 2), torch.zeros(1, 3, 2, 2), kernel="rbf",
                       sigma2="mean")
    assert torch.isfinite(dead).all()


def test_layout_does_not_matter():
    s, t = randn(2, 3, 4, 5, seed=18), randn(2, 6, 4, 5, seed=19)
    ref = channel_mmd(s, t, kernel="rbf", sigma2=(1.5,))
    out = channel_mmd(s.to(memory_format=torch.channels_last), t.transpose(2, 3).contiguous()
                      .transpose(2, 3), kernel="rbf", sigma2=(1.5,))
    torch.testing.assert_close(out, ref)


def test_unbiased_needs_two_channels_per_used_set():
    with pytest.raises(ValueError, match="at least 2 student channels"):
        channel_mmd(randn(2, 1, 2, 2), randn(2, 3, 2, 2), unbiased=True)
    with pytest.raises(ValueError, match="at least 2 teacher channels"):
        channel_mmd(randn(2, 3, 2, 2), randn(2, 1, 2, 2), unbiased=True)
    out = channel_mmd(randn(2, 3, 2, 2), randn(2, 1, 2, 2), unbiased=True, teacher_term=False)
    assert torch.isfinite(out).all()


class LargestTensor(TorchDispatchMode):
    """Records the largest numel of any tensor an op produces (works on meta tensors)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.numel = max(self.numel, value.numel())
        return out


@pytest.mark.parametrize("hw", [(32, 32), (3, 5)])
@pytest.mark.parametrize("options", KERNEL_OPTIONS + [{"kernel": "rbf", "sigma2": "mean",
                                                       "unbiased": True}])
def test_memory_sane_forward_and_backward(hw, options):
    """Nothing bigger than the features or a B x (C_s + C_t)^2 Gram block, never B*C*C*HW."""
    s = torch.empty(2, 48, *hw, device="meta", requires_grad=True)
    t = torch.empty(2, 80, *hw, device="meta", requires_grad=True)
    bound = max(t.numel(), 2 * (48 + 80) ** 2)
    with LargestTensor() as reference:
        channel_mmd(s, t, **options).sum().backward()
    with LargestTensor() as naive:
        naive_channel_mmd(s, t, **options).sum().backward()
    assert reference.numel <= bound
    assert naive.numel >= 2 * 48 * 80 * hw[0] * hw[1]  # the recorder sees the broadcast


@pytest.mark.parametrize("teacher_term", [True, False])
def test_unbiased_poly2_with_coef_on_the_feature_gram_path(teacher_term):
    # D = 4 < C: the D x D path, whose unbiased within-set sums once counted c² only
    # m(m - 1) times before taking the diagonal (m times c²) out.
    s, t = randn(3, 6, 2, 2, seed=1), randn(3, 5, 2, 2, seed=2)
    kwargs = dict(kernel="poly", degree=2, coef=0.5, unbiased=True, teacher_term=teacher_term)
    torch.testing.assert_close(channel_mmd(s, t, **kwargs), naive_channel_mmd(s, t, **kwargs))
