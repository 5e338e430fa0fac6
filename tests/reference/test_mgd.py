import torch
from torch import nn

from kdfast.reference.mgd import mgd_loss, random_spatial_mask
from tests.helpers import randn


def test_hand_computed():
    s = torch.tensor([[[[1.0, 2.0]], [[0.0, -1.0]]]], dtype=torch.float64)
    t = torch.tensor([[[[0.0, 2.0]], [[3.0, 1.0]]]], dtype=torch.float64)
    # Σ (s − t)² = 1 + 0 + 9 + 4 = 14.
    torch.testing.assert_close(mgd_loss(s, t, alpha_mgd=0.5),
                               torch.tensor([7.0], dtype=torch.float64))
    torch.testing.assert_close(mgd_loss(s, t), torch.tensor([14 * 2e-5], dtype=torch.float64))


def test_mask_drops_about_lambda_of_the_positions_with_mmrazors_rule():
    g = torch.Generator().manual_seed(0)
    mask = random_spatial_mask(4, 64, 64, 0.65, g)
    assert mask.shape == (4, 1, 64, 64) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert abs((1 - mask).mean().item() - 0.65) < 0.02
    # mmrazor: u = torch.rand((N, 1, H, W)); where(u > 1 − λ, 0, 1), on the global generator.
    torch.manual_seed(3)
    u = torch.rand((2, 1, 5, 6))
    torch.manual_seed(3)
    torch.testing.assert_close(random_spatial_mask(2, 5, 6, 0.65),
                               torch.where(u > 1 - 0.65, 0.0, 1.0))
    assert random_spatial_mask(2, 5, 6, 0.0).eq(1).all()
    assert random_spatial_mask(2, 5, 6, 1.0).eq(0).all()


def test_seeded_generators_draw_the_same_mask():
    first = random_spatial_mask(2, 7, 9, 0.5, torch.Generator().manual_seed(11))
    second = random_spatial_mask(2, 7, 9, 0.5, torch.Generator().manual_seed(11))
    assert torch.equal(first, second)


def test_full_pipeline_is_mmrazors_connector_and_loss():
    # mmrazor: MGDConnector (align 1x1, mask, generation) then MGDLoss (MSE sum / N · α),
    # transcribed independently here with the same modules and the same global seed.
    torch.manual_seed(0)
    align = nn.Conv2d(3, 4, 1).double()
    generation = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                               nn.Conv2d(4, 4, 3, padding=1)).double()
    s, t = randn(2, 3, 5, 6, seed=1), randn(2, 4, 5, 6, seed=2)
    torch.manual_seed(5)
    aligned = align(s)
    n, _, h, w = aligned.shape
    u = torch.rand((n, 1, h, w))
    expected = nn.MSELoss(reduction="sum")(
        generation(aligned * torch.where(u > 1 - 0.65, 0, 1).to(aligned)), t) / n * 2e-5
    torch.manual_seed(5)
    generated = generation(aligned * random_spatial_mask(n, h, w, 0.65).to(aligned))
    torch.testing.assert_close(mgd_loss(generated, t).mean(), expected)


def test_gradcheck():
    s = randn(2, 2, 3, 2, seed=3, requires_grad=True)
    t = randn(2, 2, 3, 2, seed=4, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: mgd_loss(a, b, 0.3), (s, t))
    assert torch.autograd.gradgradcheck(lambda a, b: mgd_loss(a, b, 0.3), (s, t))
