"""Triton channel MMD ("channel_mmd", NST) against the reference, every kernel and option."""

import pytest
import torch

from kdfast import backends
from kdfast.ops.mmd import FEATURE_GRAM, GRAM, channel_mmd_path, feature_gram_channel_mmd
from kdfast.reference import nst as nst_reference
from tests.helpers import randn
from tests.test_parity import MMD_OPTIONS
from tests.triton.parity import check_parity

pytestmark = pytest.mark.triton_interpret


@pytest.fixture(autouse=True, params=["recompute", "saved"])
def mmd_backward(request, monkeypatch):
    """Every test runs both backward paths: Gram tiles recomputed (small maps) or the
    forward's normalised Gram blocks kept."""
    from kdfast.ops import mmd as mmd_ops
    monkeypatch.setattr(mmd_ops, "MMD_RECOMPUTE_MAX_HW",
                        1 << 30 if request.param == "recompute" else 0)
    return request.param


def mmd(s, t, **options):
    return backends.choose("channel_mmd", "triton", s, t).fn(s, t, **options)


OPTIONS = MMD_OPTIONS  # the parity table's option sets (tests/test_parity.py)


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
def test_matches_reference_precise(precise, options):
    s, t = precise.randn(2, 5, 3, 7), precise.randn(2, 19, 3, 7)  # C_s != C_t, odd
    check_parity(mmd, nst_reference.channel_mmd, [s, t], precise.tol, **options)


@pytest.mark.parametrize("options", [{}, {"coef": 0.5, "unbiased": True},
                                     {"teacher_term": False}])
def test_poly2_gram_kernel_where_maps_exceed_channels(precise, options):
    s, t = precise.randn(2, 5, 4, 4), precise.randn(2, 9, 4, 4)  # D = 16 >= rows: C × C path
    assert channel_mmd_path(s, t, "poly", 2, options.get("teacher_term", True)) == GRAM
    check_parity(mmd, nst_reference.channel_mmd, [s, t], precise.tol, kernel="poly", **options)


def test_poly2_on_maps_smaller_than_the_channels_takes_the_feature_grams(precise):
    s, t = precise.randn(2, 7, 3, 2), precise.randn(2, 4, 3, 2)  # D = 6 < 11 rows
    assert channel_mmd_path(s, t, "poly", 2, True) == FEATURE_GRAM
    out = mmd(s, t, kernel="poly", coef=0.3)
    assert torch.equal(out, feature_gram_channel_mmd(s, t, coef=0.3))
    assert torch.equal(out, nst_reference.channel_mmd(s, t, kernel="poly", coef=0.3))


@pytest.mark.parametrize("kernel", ["linear", "poly", "rbf"])
def test_batch_one_layouts_and_teacher_without_grad(precise, kernel):
    s = precise.randn(1, 6, 5, 3).to(memory_format=torch.channels_last)
    t = precise.randn(1, 8, 3, 5).transpose(2, 3)[:, 1:]
    check_parity(mmd, nst_reference.channel_mmd, [s, t], precise.tol, grad_inputs=[0],
                 kernel=kernel, sigma2="mean")


@pytest.mark.parametrize("kernel", ["linear", "poly", "rbf"])
def test_all_zero_channels_follow_eps(precise, kernel):
    s, t = precise.randn(2, 4, 3, 3), precise.randn(2, 3, 3, 3)
    s[0, 1] = 0
    t[1, 2] = 0
    check_parity(mmd, nst_reference.channel_mmd, [s, t], precise.tol, kernel=kernel,
                 sigma2="mean", unbiased=True)


def test_more_channels_than_one_tile(precise):
    s, t = precise.randn(1, 21, 2, 9), precise.randn(1, 34, 2, 9)
    check_parity(mmd, nst_reference.channel_mmd, [s, t], precise.tol, kernel="rbf", sigma2=(2.0,),
                 unbiased=True)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_low_precision(device, low_precision, kernel):
    dtype = low_precision
    s, t = randn(2, 6, 4, 5).to(device, dtype), randn(2, 9, 4, 5).to(device, dtype)
    out = check_parity(mmd, nst_reference.channel_mmd, [s, t], kernel=kernel, sigma2="mean")
    assert out.dtype == torch.float32


def test_unbiased_needs_two_channels(precise):
    with pytest.raises(ValueError, match="unbiased"):
        mmd(precise.randn(1, 1, 2, 2), precise.randn(1, 3, 2, 2), unbiased=True)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("teacher_term", [True, False])
def test_teacher_gradient_alone(precise, kernel, teacher_term):
    s, t = precise.randn(2, 7, 3, 4), precise.randn(2, 4, 3, 4)
    check_parity(mmd, nst_reference.channel_mmd, [s, t], precise.tol, grad_inputs=[1],
                 kernel=kernel, sigma2=(0.5, 1.5), teacher_term=teacher_term, unbiased=True)


@pytest.mark.parametrize("sigma2", [(1e-8,), (1e-10,), "mean"])
def test_rbf_tiny_bandwidths_match_the_reference(device, sigma2):
    # Distinct rows: every off-diagonal kernel exp(−dist/2σ²) is 0 with σ² = 1e-8, 1e-10.
    s, t = randn(2, 6, 4, 5).float().to(device), randn(2, 5, 4, 5).float().to(device)
    check_parity(mmd, nst_reference.channel_mmd, [s, t], 1e-5, kernel="rbf",
                 sigma2=sigma2, unbiased=True)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("kernel", ["poly", "rbf"])
@pytest.mark.parametrize("side", [0, 1], ids=["student", "teacher"])
def test_a_nan_channel_gives_nan(device, kernel, side):
    # A NaN distance must not be clamped to 0 (tl.maximum's default is fmax: maximum(NaN, 0)
    # = 0, which made φ = 1 and the loss finite); the other sample stays finite.
    pair = [randn(2, 6, 4, 5).float().to(device), randn(2, 5, 4, 5).float().to(device)]
    pair[side][0, 2, 1, 3] = float("nan")
    pair[0].requires_grad_()
    out = mmd(*pair, kernel=kernel, sigma2=(0.5,))
    assert torch.isnan(out[0]) and torch.isfinite(out[1])
    (grad,) = torch.autograd.grad(out[1], pair[0])
    assert torch.isfinite(grad[1]).all()
