import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdfast
from kdfast.functional import dml_loss, kd_loss
from kdfast.reference.kd import dml_loss as dml_reference
from tests.helpers import REDUCTIONS, assert_rel_close, randn, reduced, toy_problem


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_reference_for_one_and_many_peers(reduction):
    z = randn(3, 5, seed=0, requires_grad=True)
    peers = [randn(3, 5, seed=1), randn(3, 5, seed=2), randn(3, 5, seed=3)]
    for given, as_list in ((peers[0], peers[:1]), (peers, peers), (tuple(peers), peers)):
        out = dml_loss(z, given, temperature=2.0, reduction=reduction)
        per_sample = dml_reference(z, as_list, 2.0)
        assert_rel_close(out, reduced(per_sample, reduction), 1e-14)


def test_one_peer_at_default_temperature_is_kd_at_t1():
    z, peer = randn(4, 6, seed=4), randn(4, 6, seed=5)
    torch.testing.assert_close(dml_loss(z, peer), kd_loss(z, peer, temperature=1.0))


def test_peers_are_detached():
    z = randn(3, 4, seed=6, requires_grad=True)
    a, b = randn(3, 4, seed=7, requires_grad=True), randn(3, 4, seed=8, requires_grad=True)
    g_z, g_a, g_b = torch.autograd.grad(dml_loss(z, [a, b]), (z, a, b), allow_unused=True)
    assert g_a is None and g_b is None
    p_z = F.softmax(z, 1)
    expected = (2 * p_z - F.softmax(a, 1) - F.softmax(b, 1)) / 2 / 3  # (1/B)(p_s - mean p_k)
    torch.testing.assert_close(g_z, expected)


def test_bad_peers():
    z = randn(2, 4)
    with pytest.raises(ValueError, match="peer_logits is an empty list"):
        dml_loss(z, [])
    with pytest.raises(TypeError, match="peer_logits must be a tensor or a list"):
        dml_loss(z, {"a": z})
    with pytest.raises(ValueError, match=r"logits and peer_logits\[1\] must have the same shape"):
        dml_loss(z, [z, randn(2, 5)])


def _peers(k, seed=0, dim=4, classes=3):
    torch.manual_seed(seed)
    return [nn.Linear(dim, classes).double() for _ in range(k)]


@pytest.mark.parametrize("mode", ["synchronous", "sequential"])
def test_mutual_learning_lowers_every_peers_loss(mode):
    x, y = toy_problem()
    models = _peers(3)
    opts = [torch.optim.SGD(m.parameters(), lr=1.0) for m in models]
    trainer = kdfast.MutualLearning(models, opts, mode=mode)
    first = trainer.step(x, y)
    for _ in range(10):
        last = trainer.step(x, y)
    assert len(last) == 3
    assert all(b < 0.5 * a for a, b in zip(first, last, strict=True)), (first, last)


def test_synchronous_gradients_are_each_peers_own():
    x, y = toy_problem(seed=1)
    models = _peers(3, seed=1)
    # lr=0: parameters stay put and .grad keeps what each peer was given.
    trainer = kdfast.MutualLearning(models, [torch.optim.SGD(m.parameters(), lr=0.0)
                                             for m in models], temperature=2.0,
                                    mimicry_weight=0.7)
    trainer.step(x, y)
    outputs = [m(x).detach() for m in models]
    for k, model in enumerate(models):
        z = model(x)
        own = F.cross_entropy(z, y) + 0.7 * kd_loss(
            z, outputs[(k + 1) % 3], temperature=2.0) / 2 + 0.7 * kd_loss(
            z, outputs[(k + 2) % 3], temperature=2.0) / 2
        expected = torch.autograd.grad(own, list(model.parameters()))
        for param, grad in zip(model.parameters(), expected, strict=True):
            torch.testing.assert_close(param.grad, grad)


def test_sequential_peers_see_the_updated_outputs():
    x, y = toy_problem(seed=2)
    models = _peers(2, seed=2)
    manual, synchronous = copy.deepcopy(models), copy.deepcopy(models)
    trainer = kdfast.MutualLearning(models, [torch.optim.SGD(m.parameters(), lr=0.3)
                                             for m in models], mode="sequential")
    trainer.step(x, y)
    opts = [torch.optim.SGD(m.parameters(), lr=0.3) for m in manual]
    for k in (0, 1):  # peer 1 learns from peer 0 *after* peer 0's update
        other = manual[1 - k](x).detach()
        loss = F.cross_entropy(manual[k](x), y) + dml_loss(manual[k](x), other)
        opts[k].zero_grad()
        loss.backward()
        opts[k].step()
    for a, b in zip(models, manual, strict=True):
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(pa, pb)
    # The synchronous update from the same start differs for peer 1 (it sees peer 0's old
    # output), so the comparison above can tell the two modes apart.
    kdfast.MutualLearning(synchronous, [torch.optim.SGD(m.parameters(), lr=0.3)
                                        for m in synchronous]).step(x, y)
    torch.testing.assert_close(synchronous[0].weight, models[0].weight)
    assert not torch.allclose(synchronous[1].weight, models[1].weight, rtol=0, atol=1e-6)


def test_mutual_learning_bad_construction():
    models = _peers(2)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    with pytest.raises(ValueError, match="at least 2 peers"):
        kdfast.MutualLearning(models[:1], opts[:1])
    with pytest.raises(ValueError, match="one optimizer per model"):
        kdfast.MutualLearning(models, opts[:1])
    with pytest.raises(ValueError, match="mode must be one of"):
        kdfast.MutualLearning(models, opts, mode="async")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        kdfast.MutualLearning(models, opts, temperature=-1.0)


def test_mutual_learning_options_are_attributes_checked_on_assignment():
    models = _peers(2)
    dml = kdfast.MutualLearning(models, [torch.optim.SGD(m.parameters(), lr=0.1)
                                         for m in models])
    assert (dml.temperature, dml.mimicry_weight, dml.mode) == (1.0, 1.0, "synchronous")
    dml.mode = "sequential"
    for name, value, error, match in (
            ("mode", "async", ValueError, "mode must be one of"),  # once fell to sequential
            ("temperature", float("nan"), ValueError, "temperature must be a finite number"),
            ("mimicry_weight", "1", TypeError, "mimicry_weight must be a number")):
        with pytest.raises(error, match=match):
            setattr(dml, name, value)
    assert (dml.temperature, dml.mimicry_weight, dml.mode) == (1.0, 1.0, "sequential")
