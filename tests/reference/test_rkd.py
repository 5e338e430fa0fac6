import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from kdfast.reference.rkd import pairwise_relations, rkd_loss
from tests.helpers import randn


def peers_rkd(f_s, f_t, w_d=25.0, w_a=50.0):
    """RepDistiller's RKDLoss.forward, verbatim up to names."""
    def pdist(e, eps=1e-12):
        e_square = e.pow(2).sum(dim=1)
        prod = e @ e.t()
        res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=eps).sqrt()
        res = res.clone()
        res[range(len(e)), range(len(e))] = 0
        return res

    student, teacher = f_s.view(f_s.shape[0], -1), f_t.view(f_t.shape[0], -1)
    with torch.no_grad():
        t_d = pdist(teacher)
        t_d = t_d / t_d[t_d > 0].mean()
    d = pdist(student)
    d = d / d[d > 0].mean()
    loss_d = F.smooth_l1_loss(d, t_d)
    with torch.no_grad():
        td = F.normalize(teacher.unsqueeze(0) - teacher.unsqueeze(1), p=2, dim=2)
        t_angle = torch.bmm(td, td.transpose(1, 2)).view(-1)
    sd = F.normalize(student.unsqueeze(0) - student.unsqueeze(1), p=2, dim=2)
    s_angle = torch.bmm(sd, sd.transpose(1, 2)).view(-1)
    loss_a = F.smooth_l1_loss(s_angle, t_angle)
    return w_d * loss_d + w_a * loss_a


def smooth_l1(x, y):
    d = abs(x - y)
    return 0.5 * d * d if d < 1 else d - 0.5


def loop_rkd(s, t, w_d, w_a):
    """Plain-Python oracle over lists of points: the formula of the paper term by term."""
    n = len(s)

    def dist(x, i, j):
        return math.dist(x[i], x[j])

    def direction(x, i, j):  # e_ij = (x_i - x_j) / |x_i - x_j|, 0 when degenerate
        norm = dist(x, i, j)
        return [(a - b) / norm if norm > 0 else 0.0 for a, b in zip(x[i], x[j], strict=True)]

    def mean_positive(x):
        d = [dist(x, i, j) for i in range(n) for j in range(n) if dist(x, i, j) > 0]
        return sum(d) / len(d)

    mu_s, mu_t = mean_positive(s), mean_positive(t)
    distance = sum(smooth_l1(dist(s, i, j) / mu_s, dist(t, i, j) / mu_t)
                   for i in range(n) for j in range(n)) / n**2
    angle = 0.0
    for i, j, k in itertools.product(range(n), repeat=3):
        cos_s = sum(a * b for a, b in zip(direction(s, i, j), direction(s, k, j), strict=True))
        cos_t = sum(a * b for a, b in zip(direction(t, i, j), direction(t, k, j), strict=True))
        angle += smooth_l1(cos_s, cos_t)
    return w_d * distance + w_a * angle / n**3


def test_matches_plain_python_oracle():
    s, t = randn(4, 3, seed=0), randn(4, 5, seed=1)
    expected = loop_rkd(s.tolist(), t.tolist(), 25.0, 50.0)
    assert rkd_loss(s, t).mean().item() == pytest.approx(expected, rel=1e-12)
    expected_d = loop_rkd(s.tolist(), t.tolist(), 1.0, 0.0)
    assert rkd_loss(s, t, 1.0, 0.0).mean().item() == pytest.approx(expected_d, rel=1e-12)


def test_matches_peers_on_distinct_rows_value_and_gradient():
    s = randn(6, 2, 3, 3, seed=2, requires_grad=True)
    t = randn(6, 10, seed=3)
    ours = rkd_loss(s, t).mean()
    theirs = peers_rkd(s, t)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=0)
    g_ours, = torch.autograd.grad(ours, s)
    g_theirs, = torch.autograd.grad(theirs, s)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-6, atol=1e-9)


def test_per_anchor_form():
    s, t = randn(5, 4, seed=4), randn(5, 6, seed=5)
    d_s, a_s = pairwise_relations(s)
    d_t, a_t = pairwise_relations(t)
    distance = F.smooth_l1_loss(d_s, d_t, reduction="none").mean(1)
    angle = F.smooth_l1_loss(a_s, a_t, reduction="none").mean((1, 2))
    torch.testing.assert_close(rkd_loss(s, t, 2.0, 3.0), 2.0 * distance + 3.0 * angle)


def test_angle_layout_is_anchor_first():
    x = randn(4, 3, seed=6)
    _, angles = pairwise_relations(x, distances=False)
    e = lambda i, j: F.normalize(x[i] - x[j], dim=0)  # noqa: E731
    torch.testing.assert_close(angles[2, 0, 3], torch.dot(e(0, 2), e(3, 2)))


def test_similarity_transform_of_teacher_gives_zero():
    s = randn(5, 3, seed=7)
    q, _ = torch.linalg.qr(randn(3, 3, seed=8))
    t = 2.5 * s @ q + 1.0  # scaled, rotated, shifted: same normalised distances and angles
    assert rkd_loss(s, t).abs().max() < 1e-12


def test_identical_rows_give_finite_small_gradients():
    s = randn(5, 4, seed=9)
    s[3] = s[1]  # two identical student embeddings
    s.requires_grad_()
    t = randn(5, 6, seed=10)
    (grad,) = torch.autograd.grad(rkd_loss(s, t).mean(), s)
    assert torch.isfinite(grad).all()
    assert grad.abs().max() < 100
    (peers_grad,) = torch.autograd.grad(peers_rkd(s, t), s)
    assert peers_grad.abs().max() > 1e5  # what the degenerate entries do in the peers' code


def test_identical_rows_in_float32_stay_finite():
    s = torch.randn(6, 32)
    s[4] = s[0]
    s.requires_grad_()
    (grad,) = torch.autograd.grad(rkd_loss(s, torch.randn(6, 8)).mean(), s)
    assert torch.isfinite(grad).all() and grad.abs().max() < 100


def test_all_identical_rows_give_zero_distances_not_nan():
    s = randn(1, 4, seed=11).expand(3, 4).clone().requires_grad_()
    d, a = pairwise_relations(s)
    assert torch.all(d == 0) and torch.all(a == 0)
    (grad,) = torch.autograd.grad(rkd_loss(s, randn(3, 4, seed=12)).sum(), s)
    assert torch.all(grad == 0)


def test_half_inputs_are_computed_in_float32():
    s = torch.randn(4, 8).half()
    assert rkd_loss(s, torch.randn(4, 8).half()).dtype == torch.float32


def test_teacher_is_detached():
    s = randn(4, 3, seed=13, requires_grad=True)
    t = randn(4, 3, seed=14, requires_grad=True)
    assert rkd_loss(s, t).sum().grad_fn is not None
    rkd_loss(s, t).sum().backward()
    assert t.grad is None


def test_gradcheck():
    s = randn(4, 3, seed=15, requires_grad=True)
    t = randn(4, 5, seed=16)
    assert torch.autograd.gradcheck(lambda x: rkd_loss(x, t), (s,))


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_a_non_finite_embedding_is_not_a_degenerate_pair(bad):
    """Only an exactly zero distance is degenerate: ``squared > 0`` is False for NaN, which
    used to drop NaN pairs like the diagonal and return a finite loss."""
    x = randn(4, 5, seed=17)
    x[2, 1] = bad
    distances, angles = pairwise_relations(x)
    assert not torch.isfinite(distances[2]).any() and not torch.isfinite(distances[:, 2]).any()
    assert not torch.isfinite(angles[2]).any()


@pytest.mark.parametrize("weights", [(25.0, 50.0), (1.0, 0.0), (0.0, 1.0)],
                         ids=["both", "distance", "angle"])
@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_a_non_finite_input_gives_a_non_finite_loss(weights, side, bad):
    s, t = randn(4, 5, seed=18), randn(4, 6, seed=19)
    (s if side == "student" else t)[1, 3] = bad
    out = rkd_loss(s.requires_grad_(), t, *weights)
    assert not torch.isfinite(out.mean())
