import copy

import pytest
import torch
from torch import nn

import kdfast
from kdfast.functional import gradient_at_loss
from kdfast.reference.gradient_attention import gradient_at_loss as reference
from tests.helpers import REDUCTIONS, randn, reduced


def nets(seed=0, dim=4, classes=3):
    torch.manual_seed(seed)
    student = nn.Sequential(nn.Linear(dim, 5), nn.Tanh(), nn.Linear(5, classes)).double()
    teacher = nn.Sequential(nn.Linear(dim, 6), nn.Tanh(), nn.Linear(6, classes)).double()
    return student, teacher.requires_grad_(False)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_reference_value_and_parameter_gradients(reduction):
    student, teacher = nets()
    y = torch.tensor([0, 2, 1, 1, 0])
    x = randn(5, 4, seed=0, requires_grad=True)
    out = gradient_at_loss(student(x), teacher(x), x, y, reduction=reduction)
    g_out = torch.autograd.grad(out.sum() * 1.3, list(student.parameters()))
    x2 = x.detach().clone().requires_grad_()
    per_sample = reference(student(x2), teacher(x2), x2, y)
    expected = reduced(per_sample, reduction)
    torch.testing.assert_close(out, expected)
    g_ref = torch.autograd.grad(expected.sum() * 1.3, list(student.parameters()))
    for a, b in zip(g_out, g_ref, strict=True):
        torch.testing.assert_close(a, b)
        assert a.abs().sum() > 0


def test_zero_for_a_copy_of_the_teacher():
    _, teacher = nets(1)
    student = copy.deepcopy(teacher).requires_grad_(True)
    x = randn(3, 4, seed=1, requires_grad=True)
    loss = gradient_at_loss(student(x), teacher(x), x, torch.tensor([0, 1, 2]))
    assert loss.item() == 0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters())


def test_loss_trains_student_gradients_towards_teacher():
    student, teacher = nets(2)
    x0, y = randn(8, 4, seed=2), torch.randint(3, (8,), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(student.parameters(), lr=0.02)
    losses = []
    for _ in range(25):
        x = x0.clone().requires_grad_()
        loss = kdfast.GradientATLoss()(student(x), teacher(x), x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_graph_requirements_give_clear_errors():
    student, teacher = nets(4)
    y = torch.tensor([0, 1])
    x = randn(2, 4, seed=4)
    with pytest.raises(ValueError, match="inputs must require grad"):
        gradient_at_loss(student(x), teacher(x), x, y)
    x.requires_grad_()
    with torch.no_grad():
        frozen = teacher(x)
    with pytest.raises(ValueError, match="teacher_logits do not depend on inputs"):
        gradient_at_loss(student(x), frozen, x, y)
    other = randn(2, 4, seed=5, requires_grad=True)
    with pytest.raises(ValueError, match="student_logits do not depend on inputs"):
        gradient_at_loss(student(other), teacher(x), x, y)


def test_bad_targets():
    student, teacher = nets(5)
    x = randn(2, 4, seed=6, requires_grad=True)
    s, t = student(x), teacher(x)
    with pytest.raises(ValueError, match=r"targets must be class indices in \[0, 2\]"):
        gradient_at_loss(s, t, x, torch.tensor([0, 3]))
    with pytest.raises(TypeError, match="targets must hold integer"):
        gradient_at_loss(s, t, x, torch.tensor([0.0, 1.0]))
