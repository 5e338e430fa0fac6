"""The Triton cores on non-finite and very large inputs (tests/test_nonfinite.py does the
reference and native backends).

``tl.maximum``'s default (``propagate_nan=NONE``) is fmax, on a GPU and under the
interpreter alike: ``maximum(NaN, 0)`` is 0. The rbf distance clamp used it and turned a NaN
distance into φ = 1, a finite loss; it now asks for ``PropagateNan.ALL``. AT's general-p power
tested ``|a| > 0``, False for NaN (0 instead of NaN); it tests ``|a| != 0``.
"""

import math

import pytest
import torch

from kdfast import functional as kf
from tests.helpers import assert_rel_close, randn

pytestmark = [pytest.mark.triton_interpret,
              # numpy (the interpreter) warns about the overflows and NaN these tests make
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]

FEATURES_S, FEATURES_T = (2, 3, 4, 5), (2, 4, 4, 5)


def nst(**options):
    return lambda s, t: kf.nst_loss(s, t, backend="triton", **options)


LOSSES = {
    "at": (lambda s, t: kf.at_loss(s, t, backend="triton"), FEATURES_S, FEATURES_T),
    "at-p3-paper": (lambda s, t: kf.at_loss(s, t, p=3.0, mode="paper", backend="triton"),
                    FEATURES_S, FEATURES_T),
    "nst-poly": (nst(), FEATURES_S, FEATURES_T),
    "nst-linear": (nst(kernel="linear"), FEATURES_S, FEATURES_T),
    "nst-rbf": (nst(kernel="rbf"), FEATURES_S, FEATURES_T),
    "nst-rbf-mean": (nst(kernel="rbf", sigma2="mean"), FEATURES_S, FEATURES_T),
    "nst-rbf-no-tt": (nst(kernel="rbf", teacher_term=False), FEATURES_S, FEATURES_T),
    "sp": (lambda s, t: kf.sp_loss(s, t, backend="triton"), (3, 3, 4, 5), (3, 2, 2, 2)),
    "fsp": (lambda s, t: kf.fsp_loss([(s, s + 1)], [(t, t - 1)], backend="triton"),
            FEATURES_S, FEATURES_S),
}


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_a_non_finite_input_gives_a_non_finite_loss(device, name, side, value):
    loss, shape_s, shape_t = LOSSES[name]
    student = randn(*shape_s, dtype=torch.float32, seed=0).to(device)
    teacher = randn(*shape_t, dtype=torch.float32, seed=1).to(device)
    poisoned = student if side == "student" else teacher
    poisoned.view(-1)[3] = value
    assert torch.isfinite(loss(randn(*shape_s, seed=0).float().to(device),
                               randn(*shape_t, seed=1).float().to(device)))
    out = loss(student.requires_grad_(), teacher)
    assert not torch.isfinite(out), f"{name} with {value} in the {side}: finite {out.item()}"


LARGE = [
    # ‖Q‖² (AT, Q ~ x²) and the Gram rows' squared norms (SP, A ~ x²·D) overflow float32 here.
    pytest.param(lambda s, t: kf.at_loss(s, t, backend="triton"), 2.0**40, id="at-2^40"),
    pytest.param(lambda s, t: kf.at_loss(s, t, backend="triton"), 2.0**62, id="at-2^62"),
    pytest.param(lambda s, t: kf.sp_loss(s, t, backend="triton"), 2.0**40, id="sp-2^40"),
    pytest.param(lambda s, t: kf.sp_loss(s, t, backend="triton"), 2.0**60, id="sp-2^60"),
]


@pytest.mark.parametrize("loss,scale", LARGE)
def test_large_finite_inputs_give_the_float64_value_and_gradient(device, loss, scale):
    s, t = randn(*FEATURES_S, seed=10), randn(*FEATURES_T, seed=11)
    expected = loss(s.requires_grad_(), t)  # float64: nothing overflows
    (expected_grad,) = torch.autograd.grad(expected, s)
    student = (s.detach() * scale).float().to(device).requires_grad_()
    out = loss(student, (t * scale).float().to(device))
    (grad,) = torch.autograd.grad(out, student)
    assert_rel_close(out.cpu(), expected, 1e-5, "value")
    assert_rel_close(grad.cpu() * scale, expected_grad, 1e-4, "gradient")


@pytest.mark.parametrize("kernel", ["poly", "rbf"])
def test_nst_whose_squared_norms_overflow_is_nan_not_silently_wrong(device, kernel):
    """Known limit: the Triton MMD kernels take raw Grams, which overflow float32 at
    |x| ≳ 1e19/√HW (the native CPU kernels redo such samples on scaled rows; deciding that
    here would need a device sync). The result is NaN, never a finite wrong value."""
    s, t = randn(*FEATURES_S, seed=12), randn(*FEATURES_T, seed=13)
    out = kf.nst_loss((s * 2.0**64).float().to(device), (t * 2.0**64).float().to(device),
                      kernel=kernel, backend="triton", reduction="none")
    expected = kf.nst_loss(s, t, kernel=kernel, backend="reference", reduction="none")
    finite = torch.isfinite(out.cpu())
    assert_rel_close(out.cpu()[finite], expected[finite].float(), 1e-5, "finite samples")
