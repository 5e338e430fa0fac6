import pytest
import torch
import torch.nn.functional as F

import kdfast
from kdfast.reference.vid import vid_loss as reference_vid
from tests.helpers import assert_rel_close, randn


def test_module_has_repdistillers_parts_and_initial_variance():
    loss = kdfast.VIDLoss(4, 6, 5).double()
    convs = [m for m in loss.regressor if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(4, 5), (5, 5), (5, 6)]
    assert all(c.kernel_size == (1, 1) and c.bias is None for c in convs)
    torch.testing.assert_close(loss.variance(), torch.full((6,), 5.0, dtype=torch.float64))
    assert "log_scale" in loss.state_dict()
    assert kdfast.VIDLoss(4, 6).regressor[0].out_channels == 6  # mid defaults to C_t


def test_forward_pools_regresses_and_matches_the_formula():
    torch.manual_seed(0)
    loss = kdfast.VIDLoss(3, 4).double()
    s, t = randn(2, 3, 8, 8, seed=1), randn(2, 4, 4, 4, seed=2)
    mu = loss.regressor(F.adaptive_avg_pool2d(s, (4, 4)))
    var = (F.softplus(loss.log_scale) + 1e-5).view(1, -1, 1, 1)
    expected = (0.5 * ((mu - t) ** 2 / var + var.log())).mean()  # RepDistiller's forward
    assert_rel_close(loss(s, t), expected, 1e-13)
    assert_rel_close(loss(s, t), reference_vid(mu, t, var.flatten()).mean(), 1e-13)


def test_gradients_reach_the_regressor_and_the_variance_head():
    loss = kdfast.VIDLoss(3, 4).double()
    s = randn(2, 3, 4, 4, seed=3, requires_grad=True)
    loss(s, randn(2, 4, 4, 4, seed=4)).backward()
    assert loss.log_scale.grad is not None and loss.log_scale.grad.abs().sum() > 0
    assert all(p.grad is not None for p in loss.regressor.parameters())
    assert s.grad is not None


def test_module_options_are_checked_on_assignment():
    loss = kdfast.VIDLoss(3, 4)
    with pytest.raises(ValueError, match="reduction must be one of"):
        loss.reduction = "avg"
    with pytest.raises(ValueError, match="eps must be > 0"):
        kdfast.VIDLoss(3, 4, eps=0.0)
    with pytest.raises(ValueError, match="init_variance must be > eps"):
        kdfast.VIDLoss(3, 4, init_variance=0.0)
    with pytest.raises(TypeError, match="student_channels must be an int"):
        kdfast.VIDLoss(3.0, 4)
    with pytest.raises(ValueError, match="pool=False"):
        kdfast.VIDLoss(3, 4, pool=False)(torch.randn(2, 3, 8, 8), torch.randn(2, 4, 4, 4))
    loss.reduction = "none"
    assert loss(torch.randn(2, 3, 4, 4), torch.randn(2, 4, 4, 4)).shape == (2,)


def test_function_checks_the_variance():
    mu, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="variance must have one entry per teacher channel"):
        kdfast.functional.vid_loss(mu, t, torch.ones(4))
    with pytest.raises(ValueError, match=r"variance must be 1-D \(C,\)"):
        kdfast.functional.vid_loss(mu, t, torch.ones(1, 3, 1, 1))
    with pytest.raises(TypeError, match="variance must be a floating-point tensor"):
        kdfast.functional.vid_loss(mu, t, torch.ones(3, dtype=torch.long))


def test_state_dict_round_trip():
    a, b = kdfast.VIDLoss(3, 4), kdfast.VIDLoss(3, 4)
    with torch.no_grad():
        a.log_scale.add_(1.0)
    b.load_state_dict(a.state_dict())
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(a(s, t), b(s, t))
