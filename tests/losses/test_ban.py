import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdfast
from kdfast.functional import ban_generation_loss, kd_loss
from tests.helpers import REDUCTIONS, randn, reduced, toy_problem


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_generation_loss_is_kd_plus_weighted_cross_entropy(reduction):
    z = randn(4, 5, seed=0, requires_grad=True)
    prev, y = randn(4, 5, seed=1), torch.tensor([0, 4, 2, 2])
    out = ban_generation_loss(z, prev, y, temperature=2.0, label_weight=0.3,
                              reduction=reduction)
    per_sample = (kd_loss(z, prev, temperature=2.0, reduction="none")
                  + 0.3 * F.cross_entropy(z, y, reduction="none"))
    torch.testing.assert_close(out, reduced(per_sample, reduction))


def test_default_is_kd_at_t1_without_labels_and_previous_is_detached():
    z = randn(3, 4, seed=2, requires_grad=True)
    prev = randn(3, 4, seed=3, requires_grad=True)
    out = ban_generation_loss(z, prev, torch.tensor([0, 1, 3]))  # label_weight=0: unused
    torch.testing.assert_close(out, kd_loss(z, prev.detach(), temperature=1.0))
    g_z, g_prev = torch.autograd.grad(out, (z, prev), allow_unused=True)
    assert g_prev is None and g_z.abs().sum() > 0


def test_generation_loss_gradcheck():
    z = randn(3, 4, seed=4, requires_grad=True)
    prev, y = randn(3, 4, seed=5), torch.tensor([1, 0, 3])
    assert torch.autograd.gradcheck(
        lambda a: ban_generation_loss(a, prev, y, temperature=2.0, label_weight=0.5), (z,))


def test_generation_loss_bad_targets():
    z = randn(2, 3)
    with pytest.raises(ValueError, match="needs targets"):
        ban_generation_loss(z, z, label_weight=1.0)
    with pytest.raises(ValueError, match=r"targets must be class indices in \[0, 2\]"):
        ban_generation_loss(z, z, torch.tensor([0, 3]), label_weight=1.0)
    with pytest.raises(TypeError, match="targets must hold integer class indices"):
        ban_generation_loss(z, z, torch.tensor([0.0, 1.0]), label_weight=1.0)
    with pytest.raises(ValueError, match=r"targets must have shape \(2,\)"):
        ban_generation_loss(z, z, torch.tensor([[0], [1]]), label_weight=1.0)


class Fixed(nn.Module):
    """Returns fixed logits whatever the input (for hand-checkable ensembles)."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits, dtype=torch.float64))

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1)


def test_ensemble_averages_probabilities_by_hand():
    # softmax([0, ln 3]) = [1/4, 3/4]; softmax([0, 0]) = [1/2, 1/2]; mean = [3/8, 5/8].
    ensemble = kdfast.BornAgainEnsemble([Fixed([0.0, math.log(3.0)]), Fixed([0.0, 0.0])])
    x = torch.zeros(2, 1)
    expected = torch.tensor([[3 / 8, 5 / 8]] * 2, dtype=torch.float64)
    torch.testing.assert_close(ensemble(x), expected)
    log_ensemble = kdfast.BornAgainEnsemble(list(ensemble.models), log_probs=True)
    torch.testing.assert_close(log_ensemble(x), expected.log())
    assert "log_probs=True" in repr(log_ensemble)


def test_ensemble_log_probs_finite_for_huge_logits():
    ensemble = kdfast.BornAgainEnsemble([Fixed([1e4, -1e4]), Fixed([-1e4, 1e4])],
                                        log_probs=True)
    out = ensemble(torch.zeros(1, 1))
    torch.testing.assert_close(out, torch.full((1, 2), -math.log(2.0), dtype=torch.float64))


def test_ensemble_bad_inputs():
    with pytest.raises(ValueError, match="models is empty"):
        kdfast.BornAgainEnsemble([])
    mismatched = kdfast.BornAgainEnsemble([Fixed([0.0, 1.0]), Fixed([0.0, 1.0, 2.0])])
    with pytest.raises(ValueError, match="output of generation 1 must have the same shape"):
        mismatched(torch.zeros(1, 1))


def _train(ban, x, y, steps=15, lr=1.0):
    opt = torch.optim.SGD(ban.student.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ban.loss(x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_born_again_generations_on_a_tiny_problem():
    torch.manual_seed(0)
    x, y = toy_problem(n=48, dim=5)
    ban = kdfast.BornAgain(lambda: nn.Linear(5, 3).double(), temperature=2.0, label_weight=0.5)
    assert ban.teacher is None
    gen0 = ban.new_generation()
    torch.testing.assert_close(ban.loss(x, y), F.cross_entropy(gen0(x), y))
    losses0 = _train(ban, x, y)
    assert losses0[-1] < 0.6 * losses0[0]

    gen1 = ban.new_generation()
    assert ban.teacher is gen0 and ban.student is gen1
    assert not any(p.requires_grad for p in gen0.parameters())
    ban.train()
    assert not gen0.training and gen1.training
    frozen = [p.clone() for p in gen0.parameters()]
    expected = ban_generation_loss(gen1(x), gen0(x), y, temperature=2.0, label_weight=0.5)
    torch.testing.assert_close(ban.loss(x, y), expected)
    losses1 = _train(ban, x, y)
    assert losses1[-1] < 0.6 * losses1[0]
    for before, after in zip(frozen, gen0.parameters(), strict=True):
        assert torch.equal(before, after)

    ensemble = ban.ensemble()
    assert len(ensemble.models) == 2 and len(ban.ensemble(start=1).models) == 1
    expected_probs = (F.softmax(gen0(x), 1) + F.softmax(gen1(x), 1)) / 2
    torch.testing.assert_close(ensemble(x), expected_probs)


def test_born_again_bad_construction():
    with pytest.raises(TypeError, match="make_model must be callable"):
        kdfast.BornAgain(nn.Linear(2, 2)(torch.zeros(1, 2)))
    with pytest.raises(TypeError, match="make_model must return an nn.Module"):
        kdfast.BornAgain(lambda: 3).new_generation()
    with pytest.raises(RuntimeError, match="new_generation"):
        kdfast.BornAgain(lambda: nn.Linear(2, 2)).loss(torch.zeros(1, 2), torch.zeros(1))


def test_born_again_options_are_attributes_checked_on_assignment():
    ban = kdfast.BornAgain(lambda: nn.Linear(2, 3), temperature=2)
    assert (ban.temperature, ban.label_weight) == (2, 0.0)
    ban.temperature, ban.label_weight = 3.0, 0.5  # e.g. a new setting for the next generation
    ban.new_generation(), ban.new_generation()
    x, y = randn(4, 2, dtype=torch.float32), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        previous = ban.teacher(x)
    torch.testing.assert_close(ban.loss(x, y), ban_generation_loss(
        ban.student(x), previous, y, temperature=3.0, label_weight=0.5))
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        ban.temperature = float("inf")
    with pytest.raises(ValueError, match="label_weight must be >= 0"):
        ban.label_weight = -1
    assert (ban.temperature, ban.label_weight) == (3.0, 0.5)
