import numpy as np
import pytest
import torch
from torch import nn

import kdfast
from kdfast.functional import adversarial_student_loss, discriminator_loss
from kdfast.reference import adversarial as reference
from tests.helpers import REDUCTIONS, randn, reduced


def _disc(num_classes=4, seed=0, **kwargs):
    torch.manual_seed(seed)
    return kdfast.ConditionalDiscriminator(num_classes, **kwargs).double()


def test_discriminator_shapes_and_architecture():
    disc = _disc(5, hidden=8, depth=3)
    out = disc(randn(6, 5, seed=0), torch.randint(5, (6,)))
    assert out.shape == (6,)
    linears = [m for m in disc.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(10, 8), (8, 8), (8, 1)]
    linear = _disc(5, depth=1)
    assert [type(m) for m in linear.net] == [nn.Linear]


def test_discriminator_is_conditioned_on_the_label():
    disc, z = _disc(3, hidden=4, depth=1), randn(1, 3, seed=1)
    weight = disc.net[0].weight[0]  # score = w . [z, onehot(y)] + b
    diff = disc(z, torch.tensor([2])) - disc(z, torch.tensor([0]))
    torch.testing.assert_close(diff, (weight[5] - weight[3]).reshape(1))


@pytest.mark.parametrize("kind", ["lsgan", "bce"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_functions_match_reference(kind, reduction):
    disc = _disc(4, hidden=6)
    s, t = randn(5, 4, seed=2, requires_grad=True), randn(5, 4, seed=3)
    y = torch.tensor([0, 3, 1, 1, 2])
    torch.testing.assert_close(
        discriminator_loss(disc, s, t, y, kind=kind, reduction=reduction),
        reduced(reference.discriminator_loss(disc, s, t, y, kind), reduction))
    torch.testing.assert_close(
        adversarial_student_loss(disc, s, t, y, kind=kind, l1_weight=0.3, reduction=reduction),
        reduced(reference.adversarial_student_loss(disc, s, t, y, kind, 0.3), reduction))


def test_default_l1_weight_is_one():
    disc = _disc(4)
    s, t, y = randn(3, 4, seed=4), randn(3, 4, seed=5), torch.tensor([0, 1, 2])
    torch.testing.assert_close(adversarial_student_loss(disc, s, t, y),
                               reference.adversarial_student_loss(disc, s, t, y, "lsgan",
                                                                  1.0).mean())


def test_discriminator_loss_trains_discriminator_only():
    disc = _disc(4)
    s, t = randn(3, 4, seed=6, requires_grad=True), randn(3, 4, seed=7, requires_grad=True)
    loss = discriminator_loss(disc, s, t, torch.tensor([0, 1, 2]))
    loss.backward()
    assert s.grad is None and t.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.parameters())


def test_student_loss_gives_no_gradient_to_discriminator_or_teacher():
    disc = _disc(4)
    s, t = randn(3, 4, seed=8, requires_grad=True), randn(3, 4, seed=9, requires_grad=True)
    loss = adversarial_student_loss(disc, s, t, torch.tensor([0, 1, 2]))
    assert all(p.requires_grad for p in disc.parameters())  # flags restored
    loss.backward()
    assert all(p.grad is None for p in disc.parameters())
    assert t.grad is None and s.grad.abs().sum() > 0


def _fixed_toy(seed=0, batch=16, classes=4):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(batch, classes, generator=g, dtype=torch.float64) * 3
    s = torch.randn(batch, classes, generator=g, dtype=torch.float64)
    return s, t, torch.randint(classes, (batch,), generator=g)


@pytest.mark.parametrize("kind", ["lsgan", "bce"])
def test_discriminator_steps_lower_its_loss_and_never_touch_the_student(kind):
    torch.manual_seed(0)
    student = nn.Linear(3, 4).double()
    x = randn(16, 3, seed=10)
    _, t, y = _fixed_toy()
    disc = _disc(4, hidden=16)
    adv = kdfast.AdversarialKD(disc, torch.optim.Adam(disc.parameters(), lr=1e-2), kind=kind)
    with torch.no_grad():
        start = discriminator_loss(adv.discriminator, student(x), t, y, kind=kind)
    for _ in range(30):
        s = student(x)
        loss = adv.step(s, t, y)
        assert all(p.grad is None for p in student.parameters())  # the D step left it alone
    with torch.no_grad():
        end = discriminator_loss(adv.discriminator, student(x), t, y, kind=kind)
    assert end < 0.5 * start, (start, end)
    d_grads = [p.grad.clone() for p in adv.discriminator.parameters()]
    loss.backward()  # the student's loss reaches the student, not D
    assert all(p.grad.abs().sum() > 0 for p in student.parameters())
    for before, p in zip(d_grads, adv.discriminator.parameters(), strict=True):
        assert torch.equal(before, p.grad)
    assert adv.last_discriminator_loss is not None and not adv.last_discriminator_loss.requires_grad


def test_default_optimizer_is_adam_with_gan_settings():
    adv = kdfast.AdversarialKD(_disc(4))
    assert isinstance(adv.optimizer, torch.optim.Adam)
    group = adv.optimizer.param_groups[0]
    assert group["lr"] == 2e-4 and group["betas"] == (0.5, 0.999)
    assert len(group["params"]) == len(list(adv.discriminator.parameters()))
    assert "kind='lsgan'" in repr(adv)


def test_alternating_training_pulls_student_towards_teacher():
    torch.manual_seed(1)
    x = randn(32, 3, seed=11)
    teacher, student = nn.Linear(3, 4).double(), nn.Linear(3, 4).double()
    y = teacher(x).argmax(1)
    disc = _disc(4, hidden=16)
    adv = kdfast.AdversarialKD(disc, torch.optim.Adam(disc.parameters(), lr=1e-2))
    opt = torch.optim.Adam(student.parameters(), lr=0.05)
    with torch.no_grad():
        t = teacher(x)
        start = (student(x) - t).abs().mean()
    for _ in range(40):
        loss = adv.step(student(x), t, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert (student(x) - t).abs().mean() < 0.5 * start


def test_bad_labels():
    disc = _disc(4)
    s, t = randn(3, 4), randn(3, 4)
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 3\]"):
        discriminator_loss(disc, s, t, torch.tensor([0, 4, 1]))
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 3\]"):
        adversarial_student_loss(disc, s, t, torch.tensor([0, -1, 1]))
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        discriminator_loss(disc, s, t, torch.tensor([[0], [1], [2]]))
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        discriminator_loss(disc, s, t, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="labels must hold integer class indices"):
        discriminator_loss(disc, s, t, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
        discriminator_loss(disc, s, t, [0, 1, 2])
    with pytest.raises(ValueError, match="labels is on meta"):
        discriminator_loss(disc, s, t, torch.empty(3, dtype=torch.int64, device="meta"))
    with pytest.raises(ValueError, match=r"labels must be class indices"):
        disc(s, torch.tensor([0, 1, 9]))


def test_bad_discriminators():
    disc = _disc(4)
    s, y = randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="logits have 5 classes"):
        disc(randn(3, 5), y)
    with pytest.raises(ValueError, match="one score per sample"):
        discriminator_loss(lambda z, lab: z, s, s, y)
    with pytest.raises(TypeError, match="discriminator must be a module or callable"):
        discriminator_loss("D", s, s, y)
    with pytest.raises(ValueError, match="depth must be a positive int"):
        kdfast.ConditionalDiscriminator(4, depth=0)
    with pytest.raises(ValueError, match="discriminator_steps must be a positive int"):
        kdfast.AdversarialKD(disc, discriminator_steps=0)
    with pytest.raises(TypeError, match="discriminator must be an nn.Module"):
        kdfast.AdversarialKD(lambda z, lab: z.sum(1))


def test_options_are_attributes_checked_on_assignment():
    adv = kdfast.AdversarialKD(_disc(4), kind="bce", l1_weight=np.float32(0.5))
    assert (adv.kind, adv.l1_weight, adv.discriminator_steps) == ("bce", 0.5, 1)
    adv.discriminator_steps = 2
    assert "discriminator_steps=2" in repr(adv)
    for name, value, match in (("kind", "wgan", "kind must be one of"),
                               ("l1_weight", float("nan"), "l1_weight must be a finite number"),
                               ("discriminator_steps", 0, "discriminator_steps must be a "
                                                          "positive int")):
        with pytest.raises((ValueError, TypeError), match=match):
            setattr(adv, name, value)
    assert (adv.kind, adv.l1_weight, adv.discriminator_steps) == ("bce", 0.5, 2)
