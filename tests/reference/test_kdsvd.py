import math

import pytest
import torch

from kdfast.reference.kdsvd import align_signs, kdsvd_loss, top_singular
from tests.helpers import randn


def diagonal_map(norms) -> torch.Tensor:
    """A (1, C, 1, C) map whose (H*W, C) matrix is diag(norms): right singular vectors are
    the basis vectors e_c, in the order of decreasing norm."""
    c = len(norms)
    x = torch.diag(torch.tensor(norms, dtype=torch.float64))  # x[w, c]
    return x.t().reshape(1, c, 1, c).contiguous()


def test_top_singular_of_a_diagonal_map():
    vectors, values = top_singular(diagonal_map([1.0, 5.0, 4.0, 3.0, 2.0]), 2)
    torch.testing.assert_close(vectors.abs()[0], torch.eye(5, dtype=torch.float64)[:, 1:3])
    torch.testing.assert_close(values, torch.tensor([[5.0, 4.0]],
                                                    dtype=torch.float64) / math.sqrt(41))


def test_align_signs_picks_the_most_aligned_vector_with_its_sign():
    student = torch.tensor([[[1.0, 0.0], [0.0, -1.0]]], dtype=torch.float64)  # e0, -e1
    teacher = torch.tensor([[[0.0], [1.0]]], dtype=torch.float64)  # e1
    torch.testing.assert_close(align_signs(student, teacher), teacher)


def test_by_hand_when_the_student_misses_the_teachers_direction():
    # Layer 0: student = teacher, top vector e0. Layer 1: the teacher's top vector is e0, but
    # e0 is the student's smallest of 5, outside its top k + 3 = 4: its aligned vector is 0.
    t0 = t1 = diagonal_map([5.0, 4.0, 3.0, 2.0, 1.0])
    s1 = diagonal_map([1.0, 5.0, 4.0, 3.0, 2.0])
    signs = [torch.sign(top_singular(t, 1)[0][0, 0, 0]).item() for t in (t0, t1)]
    teacher_corner = math.exp(-(signs[1] - signs[0]) ** 2 / 8)
    e8 = math.exp(-1 / 8)
    expected = (e8 - teacher_corner) ** 2 + 4 * (1 - e8) ** 2
    torch.testing.assert_close(kdsvd_loss([t0, s1], [t0, t1]),
                               torch.tensor([expected], dtype=torch.float64))


def test_zero_for_the_teacher_its_negation_and_its_multiples():
    maps = [randn(3, 4, 5, 5, seed=0), randn(3, 6, 3, 3, seed=1), randn(3, 6, 2, 2, seed=2)]
    for student in (maps, [-m for m in maps], [3.0 * m for m in maps]):
        assert kdsvd_loss(student, maps).abs().max() < 1e-20


def separated_map(batch: int, channels: int, size: int, seed: int) -> torch.Tensor:
    """A map whose (H*W, C) matrices have singular values 1, 2, ..., well apart."""
    g = torch.Generator().manual_seed(seed)
    hw = size * size
    u = torch.linalg.qr(torch.randn(batch, hw, channels, generator=g,
                                    dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(batch, channels, channels, generator=g,
                                    dtype=torch.float64))[0]
    values = torch.arange(channels, 0, -1, dtype=torch.float64)
    x = u @ torch.diag_embed(values.expand(batch, -1)) @ v.transpose(1, 2)  # (B, HW, C)
    return x.transpose(1, 2).reshape(batch, channels, size, size)


@pytest.mark.parametrize("k", [1, 2])
def test_gradcheck_on_well_separated_singular_values(k):
    # SVD gradients divide by s_i^2 - s_j^2: checked here on gaps of at least 1 only.
    s0 = separated_map(2, 3, 3, seed=3).requires_grad_()
    s1 = separated_map(2, 4, 2, seed=4).requires_grad_()
    t0, t1 = separated_map(2, 3, 3, seed=5), separated_map(2, 4, 2, seed=6)
    assert torch.autograd.gradcheck(lambda a, b: kdsvd_loss([a, b], [t0, t1], k), (s0, s1))


def test_teacher_gets_no_gradient():
    t0 = separated_map(2, 3, 3, seed=7).requires_grad_()
    t1 = separated_map(2, 4, 2, seed=8).requires_grad_()
    loss = kdsvd_loss([separated_map(2, 3, 3, seed=9), separated_map(2, 4, 2, seed=10)],
                      [t0, t1]).sum()
    assert not loss.requires_grad
