"""Mixed precision: under torch.autocast every loss returns fp32, equal to the fp32 loss of the
same (low-precision) values, with gradients in the input dtype."""

import pytest
import torch

import kdfast
from kdfast import functional as KF
from tests.helpers import assert_rel_close


def features(*shape, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator)


FEATURE_LOSSES = {
    "at": lambda s, t: KF.at_loss(s, t),
    "at-paper-p3": lambda s, t: KF.at_loss(s, t, p=3.0, mode="paper"),
    "nst-poly": lambda s, t: KF.nst_loss(s, t),
    "nst-rbf": lambda s, t: KF.nst_loss(s, t, kernel="rbf", sigma2="mean"),
    "nst-linear": lambda s, t: KF.nst_loss(s, t, kernel="linear"),
    "sp": lambda s, t: KF.sp_loss(s, t),
    "rkd": lambda s, t: KF.rkd_loss(s, t),
    "fsp": lambda s, t: KF.fsp_loss([(s, s.flip(1))], [(t[:, :3], t[:, 2:])]),
    "ab": lambda s, t: KF.ab_loss(s, t[:, :3]),
    "fitnet": lambda s, t: KF.fitnet_loss(s, t[:, :3]),
}
LOGIT_LOSSES = {
    "kd": lambda s, t: KF.kd_loss(s, t),
    "dml": lambda s, t: KF.dml_loss(s, [t, t.flip(0)]),
    "ban": lambda s, t: KF.ban_generation_loss(s, t, torch.arange(s.shape[0]) % s.shape[1],
                                               label_weight=0.5),
}


def check_amp(loss, student32, teacher32, dtype):
    student = student32.to(dtype).requires_grad_(True)
    teacher = teacher32.to(dtype)
    with torch.autocast("cpu", dtype=dtype):
        out = loss(student, teacher)
    assert out.dtype == torch.float32
    (grad,) = torch.autograd.grad(out, student)
    assert grad.dtype == dtype
    # The fp32 loss of the same low-precision values, without autocast.
    exact_student = student.detach().float().requires_grad_(True)
    expected = loss(exact_student, teacher.float())
    (expected_grad,) = torch.autograd.grad(expected, exact_student)
    assert_rel_close(out, expected, 1e-5, "value")
    assert_rel_close(grad, expected_grad.to(dtype), 1e-2, "gradient")


@pytest.mark.parametrize("name", sorted(FEATURE_LOSSES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_feature_losses_under_autocast(name, dtype):
    check_amp(FEATURE_LOSSES[name], features(4, 3, 6, 6, seed=0), features(4, 5, 6, 6, seed=1),
              dtype)


@pytest.mark.parametrize("name", sorted(LOGIT_LOSSES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_logit_losses_under_autocast(name, dtype):
    check_amp(LOGIT_LOSSES[name], features(4, 7, seed=2) * 3, features(4, 7, seed=3) * 3, dtype)


def test_connector_runs_under_autocast_and_loss_is_fp32():
    loss = kdfast.FitNetLoss(4, 6)
    student = features(2, 4, 5, 5, seed=4).requires_grad_(True)
    teacher = features(2, 6, 5, 5, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(student, teacher)
    assert out.dtype == torch.float32
    out.backward()
    assert loss.connector[0].weight.grad is not None
    assert torch.isfinite(loss.connector[0].weight.grad).all()


def test_sp_gram_does_not_overflow_in_fp16():
    # Row norms^2 of 100 * N(0,1) over D = 4096 are ~4e7: far above fp16's 65504.
    student = (features(3, 16, 16, 16, seed=6) * 100).half()
    teacher = (features(3, 8, 16, 16, seed=7) * 100).half()
    out = KF.sp_loss(student, teacher)
    assert torch.isfinite(out)
    assert_rel_close(out, KF.sp_loss(student.float(), teacher.float()), 1e-5)
