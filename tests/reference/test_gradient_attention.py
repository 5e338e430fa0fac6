import torch
import torch.nn.functional as F
from torch import nn

from kdfast.reference.gradient_attention import gradient_at_loss, input_gradient
from tests.helpers import randn


def linear_input_gradient(weight, bias, x, y):
    """Analytic J for z = x W^T + b and summed CE: J_b = (softmax(z_b) - e_{y_b})^T W."""
    p = F.softmax(x @ weight.T + bias, dim=1)
    return (p - F.one_hot(y, weight.shape[0]).to(x.dtype)) @ weight


def test_input_gradient_of_linear_model_is_analytic():
    w, b = randn(3, 5, seed=0), randn(3, seed=1)
    x = randn(4, 5, seed=2, requires_grad=True)
    y = torch.tensor([0, 2, 1, 2])
    got = input_gradient(x @ w.T + b, x, y, create_graph=False)
    torch.testing.assert_close(got, linear_input_gradient(w, b, x.detach(), y))


def test_each_samples_gradient_is_independent_of_the_batch():
    w, b = randn(3, 5, seed=3), randn(3, seed=4)
    x = randn(4, 5, seed=5)
    y = torch.tensor([1, 0, 2, 2])
    x_all, x_one = x.clone().requires_grad_(), x[:1].clone().requires_grad_()
    j_all = input_gradient(x_all @ w.T + b, x_all, y, create_graph=False)
    j_one = input_gradient(x_one @ w.T + b, x_one, y[:1], create_graph=False)
    torch.testing.assert_close(j_all[:1], j_one)


def test_loss_of_two_linear_models_by_hand():
    ws, bs, wt, bt = randn(3, 5, seed=6), randn(3, seed=7), randn(3, 5, seed=8), randn(3, seed=9)
    x = randn(4, 5, seed=10, requires_grad=True)
    y = torch.tensor([2, 2, 0, 1])
    loss = gradient_at_loss(x @ ws.T + bs, x @ wt.T + bt, x, y)
    x0 = x.detach()
    diff = linear_input_gradient(ws, bs, x0, y) - linear_input_gradient(wt, bt, x0, y)
    torch.testing.assert_close(loss, diff.norm(dim=1))


def test_flattens_image_shaped_inputs():
    w = randn(3, 2 * 2 * 2, seed=11)
    x = randn(2, 2, 2, 2, seed=12, requires_grad=True)
    y = torch.tensor([0, 1])
    loss = gradient_at_loss(x.flatten(1) @ w.T, x.flatten(1) @ (2 * w).T, x, y)
    js = linear_input_gradient(w, torch.zeros(3, dtype=w.dtype), x.detach().flatten(1), y)
    jt = linear_input_gradient(2 * w, torch.zeros(3, dtype=w.dtype), x.detach().flatten(1), y)
    torch.testing.assert_close(loss, (js - jt).norm(dim=1))


def tiny_net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def test_gradcheck_wrt_student_parameters():
    student, teacher = tiny_net(0), tiny_net(1)
    x0, y = randn(3, 4, seed=13), torch.tensor([0, 2, 1])
    params = tuple(p.detach().clone().requires_grad_() for p in student.parameters())
    names = [name for name, _ in student.named_parameters()]

    def loss(*values):
        x = x0.clone().requires_grad_()
        z_s = torch.func.functional_call(student, dict(zip(names, values, strict=True)), (x,))
        return gradient_at_loss(z_s, teacher(x), x, y).sum()

    assert torch.autograd.gradcheck(loss, params)


def test_zero_with_finite_gradient_when_student_is_teacher():
    net = tiny_net(2)
    x, y = randn(3, 4, seed=14, requires_grad=True), torch.tensor([1, 1, 0])
    z = net(x)
    loss = gradient_at_loss(z, z, x, y)
    assert torch.all(loss == 0)
    loss.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
