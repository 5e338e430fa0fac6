import pickle

import pytest
import torch

import kdfast
from kdfast.functional import mgd_loss
from kdfast.reference.mgd import mgd_loss as reference_mgd
from kdfast.reference.mgd import random_spatial_mask
from tests.helpers import randn


def test_function_masks_generates_and_weights():
    torch.manual_seed(0)
    generation = kdfast.make_generation_block(4).double()
    align = torch.nn.Conv2d(3, 4, 1).double()
    s, t = randn(2, 3, 5, 6, seed=1), randn(2, 4, 5, 6, seed=2)
    got = mgd_loss(s, t, generation, align=align, alpha_mgd=1e-3, lambda_mgd=0.5,
                   generator=torch.Generator().manual_seed(7), reduction="none")
    mask = random_spatial_mask(2, 5, 6, 0.5, torch.Generator().manual_seed(7)).double()
    torch.testing.assert_close(got, reference_mgd(generation(align(s) * mask), t, 1e-3))


def test_identity_generation_without_a_mask_is_the_summed_squared_error():
    s, t = randn(2, 3, 4, 4, seed=3), randn(2, 3, 4, 4, seed=4)
    got = mgd_loss(s, t, lambda x: x, lambda_mgd=0.0, alpha_mgd=1.0, reduction="sum")
    torch.testing.assert_close(got, (s - t).pow(2).sum())
    everything_masked = mgd_loss(s, t, lambda x: x, lambda_mgd=1.0, alpha_mgd=1.0)
    torch.testing.assert_close(everything_masked, t.pow(2).sum() / 2)


def test_module_has_mmrazors_parts_and_defaults():
    mgd = kdfast.MGDLoss(3, 5)
    assert isinstance(mgd.align, torch.nn.Conv2d) and mgd.align.kernel_size == (1, 1)
    convs = [m for m in mgd.generation if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(3, 3), (3, 3)]
    assert isinstance(mgd.generation[1], torch.nn.ReLU)
    assert mgd.alpha_mgd == 2e-5 and mgd.lambda_mgd == 0.65 and mgd.reduction == "mean"
    assert kdfast.MGDLoss(4, 4).align is None
    assert sum(p.numel() for p in mgd.parameters()) > 0


def test_seeded_module_is_reproducible_and_its_generator_checkpoints():
    torch.manual_seed(0)
    first = kdfast.MGDLoss(3, 4, seed=1)
    second = kdfast.MGDLoss(3, 4, seed=1)
    second.load_state_dict(first.state_dict())
    s, t = randn(2, 3, 5, 5, seed=5).float(), randn(2, 4, 5, 5, seed=6).float()
    assert torch.equal(first(s, t), second(s, t))
    checkpoint = first.state_dict()  # after one draw: the generator state moved on
    resumed = kdfast.MGDLoss(3, 4)
    resumed.load_state_dict(checkpoint)
    assert torch.equal(first(s, t), resumed(s, t))
    assert torch.equal(pickle.loads(pickle.dumps(first))(s, t), first(s, t))


def test_module_trains_its_generation_block():
    torch.manual_seed(0)
    mgd = kdfast.MGDLoss(3, 4, alpha_mgd=1.0, seed=0)
    s, t = torch.randn(2, 3, 6, 6), torch.randn(2, 4, 6, 6)
    optimiser = torch.optim.Adam(mgd.parameters(), lr=1e-2)
    first = mgd(s, t).item()
    for _ in range(30):
        optimiser.zero_grad()
        mgd(s, t).backward()
        optimiser.step()
    assert mgd(s, t).item() < first


def test_module_options_are_validated_on_assignment():
    mgd = kdfast.MGDLoss(3, 4)
    with pytest.raises(ValueError, match="lambda_mgd must be <= 1"):
        mgd.lambda_mgd = 2.0
    assert mgd.lambda_mgd == 0.65
    mgd.alpha_mgd = 1.0
    assert "alpha_mgd=1.0" in repr(mgd)
    with pytest.raises(ValueError, match="student_channels must be a positive int"):
        kdfast.MGDLoss(0, 4)
    with pytest.raises(TypeError, match="seed must be an int"):
        kdfast.MGDLoss(3, 4, seed=1.5)
    with pytest.raises(TypeError, match="generation must be a callable"):
        mgd_loss(torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2), None)
