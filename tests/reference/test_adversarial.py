import torch
import torch.nn.functional as F

from kdfast.reference.adversarial import (
    adversarial_student_loss,
    condition,
    discriminator_loss,
    discriminator_terms,
    generator_term,
    l1_logit_loss,
)
from tests.helpers import randn


def score(logits, labels):
    """A hand-checkable discriminator: D(z, y) = sum(z) + y."""
    return logits.sum(dim=1) + labels.to(logits.dtype)


def test_condition_concatenates_one_hot_label():
    z = torch.tensor([[0.5, -1.0, 2.0]])
    expected = torch.tensor([[0.5, -1.0, 2.0, 0.0, 0.0, 1.0]])
    torch.testing.assert_close(condition(z, torch.tensor([2])), expected)


def test_lsgan_losses_by_hand():
    s = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    t = torch.tensor([[2.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    # D(s) = [1, 2], D(t) = [3, 0].
    d = discriminator_loss(score, s, t, y, "lsgan")
    expected_d = torch.tensor([0.5 * 4 + 0.5 * 1, 0.5 * 1 + 0.5 * 4], dtype=torch.float64)
    torch.testing.assert_close(d, expected_d)
    # student: 1/2 (D(s) - 1)^2 + lambda * mean |s - t| = [0 + .5 * 1, .5 + .5 * 1]
    g = adversarial_student_loss(score, s, t, y, "lsgan", 0.5)
    torch.testing.assert_close(g, torch.tensor([0.5, 1.0], dtype=torch.float64))


def test_bce_terms_match_binary_cross_entropy():
    real, fake = randn(5, seed=0), randn(5, seed=1)
    ones, zeros = torch.ones(5, dtype=real.dtype), torch.zeros(5, dtype=real.dtype)
    expected_d = (F.binary_cross_entropy_with_logits(real, ones, reduction="none")
                  + F.binary_cross_entropy_with_logits(fake, zeros, reduction="none"))
    torch.testing.assert_close(discriminator_terms(real, fake, "bce"), expected_d)
    torch.testing.assert_close(generator_term(fake, "bce"),
                               F.binary_cross_entropy_with_logits(fake, ones, reduction="none"))


def test_l1_is_mean_over_classes():
    s, t = randn(3, 4, seed=2), randn(3, 4, seed=3)
    torch.testing.assert_close(l1_logit_loss(s, t), F.l1_loss(s, t, reduction="none").mean(1))


def test_discriminator_loss_detaches_both_logits():
    s, t = randn(3, 4, seed=4, requires_grad=True), randn(3, 4, seed=5, requires_grad=True)
    loss = discriminator_loss(score, s, t, torch.tensor([0, 1, 2]), "lsgan")
    assert not loss.requires_grad


def test_student_loss_gradcheck():
    s, t = randn(3, 4, seed=6, requires_grad=True), randn(3, 4, seed=7)
    y = torch.tensor([3, 0, 1])
    for kind in ("lsgan", "bce"):
        assert torch.autograd.gradcheck(
            lambda a, k=kind: adversarial_student_loss(score, a, t, y, k, 0.7), (s,))
