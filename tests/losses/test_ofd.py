import pytest
import torch

import kdfast
from kdfast.functional import ofd_loss, ofd_margin
from kdfast.reference.ofd import partial_l2
from tests.helpers import docstring_example_loss, randn, run_docstring_example


def teacher_bn(channels=3, seed=0):
    torch.manual_seed(seed)
    bn = torch.nn.BatchNorm2d(channels).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    return bn


@pytest.mark.parametrize("example", [ofd_loss, kdfast.OFDLoss])
def test_docstring_example_runs(example):
    assert docstring_example_loss(example) > 0


def test_margin_example_runs():
    assert run_docstring_example(ofd_margin) == torch.Size([64])


def test_reductions_act_on_the_per_sample_partial_l2():
    s, t = randn(3, 3, 4, 5, seed=1), randn(3, 3, 4, 5, seed=2)
    margin = ofd_margin(teacher_bn())
    rows = partial_l2(s, t, margin)
    torch.testing.assert_close(ofd_loss(s, t, margin, reduction="none"), rows)
    torch.testing.assert_close(ofd_loss(s, t, margin, reduction="sum"), rows.sum())
    torch.testing.assert_close(ofd_loss(s, t, margin), rows.sum() / 3)  # the authors' sum / B


def test_module_without_connector_is_the_function_on_its_margin():
    bn = teacher_bn()
    s, t = randn(2, 3, 4, 4, seed=3), randn(2, 3, 4, 4, seed=4)
    loss = kdfast.OFDLoss(bn, reduction="none")
    assert loss.connector is None
    torch.testing.assert_close(loss(s, t), ofd_loss(s, t, ofd_margin(bn), reduction="none"))


def test_only_the_student_side_gets_gradients():
    loss = kdfast.OFDLoss(teacher_bn(4), student_channels=3).double()
    s = randn(2, 3, 4, 4, seed=5, requires_grad=True)
    t = randn(2, 4, 4, 4, seed=6, requires_grad=True)
    loss(s, t).backward()
    assert s.grad.abs().sum() > 0 and loss.connector[0].weight.grad.abs().sum() > 0
    assert t.grad is None or not t.grad.any()
    assert not loss.margin.requires_grad


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_no_fused_backend_on_the_function_and_the_module(backend):
    s, t = randn(2, 3, 4, 4, seed=7), randn(2, 3, 4, 4, seed=8)
    margin = ofd_margin(teacher_bn())
    with pytest.raises(ValueError, match=f"backend='{backend}' cannot run ofd"):
        ofd_loss(s, t, margin, backend=backend)
    with pytest.raises(ValueError, match=f"backend='{backend}' cannot run ofd"):
        kdfast.OFDLoss(teacher_bn(), backend=backend)(s, t)
    torch.testing.assert_close(kdfast.OFDLoss(teacher_bn(), backend="reference")(s, t),
                               ofd_loss(s, t, margin))


def test_errors_name_the_input_and_the_fix():
    s, t = randn(2, 3, 4, 4, seed=9), randn(2, 3, 4, 4, seed=10)
    margin = ofd_margin(teacher_bn())
    with pytest.raises(ValueError, match="margin is on meta but teacher is on cpu.*margin.to"):
        ofd_loss(s, t, margin.to("meta"))
    with pytest.raises(ValueError, match="student must be 4-D"):
        kdfast.OFDLoss(teacher_bn(4), student_channels=3)(s.flatten(1), t)
    with pytest.raises(ValueError, match="student and teacher must have the same shape.*"
                                         "kdfast.OFDLoss has one"):
        kdfast.OFDLoss(teacher_bn(4))(s, randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match="student_channels must be a positive int"):
        kdfast.OFDLoss(teacher_bn(), student_channels=True)
