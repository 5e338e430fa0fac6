import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdfast
from kdfast.functional import fitnet_loss
from kdfast.reference.fitnet import hint_loss
from tests.helpers import REDUCTIONS, assert_rel_close, grads, randn, reduced


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reductions_match_reference(reduction):
    s, t = randn(3, 4, 5, 6, seed=0), randn(3, 4, 5, 6, seed=1)
    torch.testing.assert_close(fitnet_loss(s, t, reduction=reduction),
                               reduced(hint_loss(s, t), reduction))


def test_default_is_global_mse_and_gradient():
    s = randn(2, 3, 4, 4, seed=2, requires_grad=True)
    t = randn(2, 3, 4, 4, seed=3)
    out = fitnet_loss(s, t)
    torch.testing.assert_close(out, F.mse_loss(s, t))
    (g,) = grads(out, [s], grad_output=1.7)
    assert_rel_close(g, 1.7 * 2 * (s - t) / s.numel(), 1e-12)


@pytest.mark.parametrize("s_shape,t_shape,kind", [
    ((5, 8, 8), (7, 8, 8), nn.Conv2d),          # same H: 1x1
    ((5, 8, 8), (7, 4, 4), nn.Conv2d),          # H_s = 2 H_t: 3x3 stride 2
    ((5, 7, 7), (7, 4, 4), nn.Conv2d),          # H_s > H_t, not 2x: valid conv kernel 4
    ((5, 4, 4), (7, 8, 8), nn.ConvTranspose2d),  # 2 H_s = H_t: 4x4 transposed
    ((5, 9, 9), (7, 4, 4), nn.Conv2d),          # H_s > H_t: valid conv kernel 6
    ((5, 6, 9), (7, 6, 4), nn.Conv2d),          # per-dimension valid conv
])
def test_connector_rules_map_student_to_teacher_shape(s_shape, t_shape, kind):
    connector = kdfast.make_connector(s_shape, t_shape)
    assert isinstance(connector[0], kind)
    assert isinstance(connector[1], nn.BatchNorm2d) and isinstance(connector[2], nn.ReLU)
    assert connector(torch.randn(2, *s_shape)).shape == (2, *t_shape)


def test_connector_kernels_follow_the_rules():
    assert kdfast.make_connector(4, 6)[0].kernel_size == (1, 1)
    c = kdfast.make_connector((1, 4, 8, 8), (1, 6, 4, 4))[0]
    assert (c.kernel_size, c.stride, c.padding) == ((3, 3), (2, 2), (1, 1))
    c = kdfast.make_connector((4, 4, 4), (6, 8, 8))[0]
    assert (c.kernel_size, c.stride, c.padding) == ((4, 4), (2, 2), (1, 1))
    assert kdfast.make_connector((4, 9, 9), (6, 4, 4))[0].kernel_size == (6, 6)
    assert len(kdfast.make_connector(4, 6, relu=False)) == 2


@pytest.mark.parametrize("student,teacher,error,match", [
    ((4, 3, 3), (6, 8, 8), ValueError, "no connector rule"),
    ((4, 8, 3), (6, 4, 4), ValueError, "no connector rule"),
    (4, (6, 4, 4), ValueError, "both be channel counts or both be shapes"),
    ((4, 4), (6, 4, 4), TypeError, "channel count"),
    (0, 4, ValueError, "positive"),
    (4.0, 4, TypeError, "channel count"),
])
def test_make_connector_rejects(student, teacher, error, match):
    with pytest.raises(error, match=match):
        kdfast.make_connector(student, teacher)


def test_module_holds_a_trainable_connector():
    loss = kdfast.FitNetLoss.from_shapes((2, 4, 8, 8), (2, 6, 4, 4))
    assert isinstance(loss.connector, nn.Sequential)
    params = list(loss.parameters())
    assert params
    s, t = randn(2, 4, 8, 8, dtype=torch.float32), randn(2, 6, 4, 4, dtype=torch.float32)
    out = loss(s, t)
    torch.testing.assert_close(out, fitnet_loss(s, t, connector=loss.connector))
    out.backward()
    assert all(p.grad is not None for p in params)
    assert "connector" in repr(loss)


def test_module_with_channels_and_sizes():
    loss = kdfast.FitNetLoss(4, 6, student_size=(4, 4), teacher_size=8, relu=False)
    assert isinstance(loss.connector[0], nn.ConvTranspose2d) and len(loss.connector) == 2
    assert loss(torch.randn(2, 4, 4, 4), torch.randn(2, 6, 8, 8)).ndim == 0
    assert kdfast.FitNetLoss(4, 6).connector[0].kernel_size == (1, 1)


def test_module_without_connector_is_plain_hint_loss():
    s, t = randn(2, 3, 4, 4), randn(2, 3, 4, 4)
    loss = kdfast.FitNetLoss(reduction="sum")
    assert loss.connector is None and not list(loss.parameters())
    torch.testing.assert_close(loss(s, t), hint_loss(s, t).sum())


@pytest.mark.parametrize("kwargs,error,match", [
    ({"student_channels": 4}, ValueError, "both student_channels and teacher_channels"),
    ({"student_channels": 4, "teacher_channels": 6, "student_size": 4}, ValueError,
     "both student_size and teacher_size"),
    ({"student_size": 4, "teacher_size": 4}, ValueError, "need student_channels"),
])
def test_module_rejects_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        kdfast.FitNetLoss(**kwargs)


def test_from_shapes_needs_shapes():
    with pytest.raises(TypeError, match="student_shape and teacher_shape"):
        kdfast.FitNetLoss.from_shapes(4, 6)


def test_hand_values():
    s = randn(2, 3, 4, 4)
    assert fitnet_loss(s, s.clone()) == 0
    torch.testing.assert_close(fitnet_loss(s, s + 1), torch.tensor(1.0, dtype=s.dtype))


def test_bad_connectors():
    s = randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"connector\(student\) and teacher must have the same"):
        fitnet_loss(s, randn(2, 5, 2, 2), connector=nn.Conv2d(3, 5, 1).double())
    with pytest.raises(TypeError, match="connector must be a callable"):
        fitnet_loss(s, s, connector="conv")


def test_gradcheck_with_connector():
    conv = nn.Conv2d(2, 3, 1).double()
    s = randn(2, 2, 3, 3, seed=6, requires_grad=True)
    t = randn(2, 3, 3, 3, seed=7)
    assert torch.autograd.gradcheck(lambda x: fitnet_loss(x, t, connector=conv), (s,))
