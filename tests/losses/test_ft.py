import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdfast
from tests.helpers import randn


def test_paraphraser_and_translator_shapes_and_layers():
    paraphraser, translator = kdfast.Paraphraser(8), kdfast.Translator(4, 8)
    factor, reconstruction = paraphraser(torch.randn(2, 8, 5, 5))
    assert factor.shape == (2, 4, 5, 5) and reconstruction.shape == (2, 8, 5, 5)
    torch.testing.assert_close(paraphraser.encode(torch.ones(1, 8, 5, 5)),
                               paraphraser(torch.ones(1, 8, 5, 5))[0])
    assert translator(torch.randn(2, 4, 5, 5)).shape == (2, 4, 5, 5)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in paraphraser.modules())  # RepDistiller
    assert sum(isinstance(m, nn.BatchNorm2d) for m in translator.modules()) == 3
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in paraphraser.decoder) == 3
    assert kdfast.Paraphraser(8, rate=0.25).encode(torch.randn(1, 8, 2, 2)).shape[1] == 2


def test_state_dict_keys_are_repdistillers():
    # RepDistiller's layers: conv, BatchNorm or an empty nn.Sequential(), LeakyReLU, x 3.
    weights = {f"{part}.{i}.{name}" for part in ("encoder", "decoder") for i in (0, 3, 6)
               for name in ("weight", "bias")}
    assert set(kdfast.Paraphraser(8).state_dict()) == weights
    translator_keys = set(kdfast.Translator(4, 8).state_dict())
    assert {k for k in translator_keys if k.endswith(".weight")} == {
        f"encoder.{i}.weight" for i in (0, 1, 3, 4, 6, 7)}


def test_module_arguments_are_checked():
    with pytest.raises(ValueError, match="leaves no factor channel"):
        kdfast.Paraphraser(1, rate=0.5)
    with pytest.raises(TypeError, match="channels must be an int"):
        kdfast.Paraphraser(8.0)
    with pytest.raises(TypeError, match="batch_norm must be True or False"):
        kdfast.Translator(4, 8, batch_norm=1)


def test_reconstruction_loss_is_the_mse_and_detaches_the_teacher():
    paraphraser = kdfast.Paraphraser(4).double()
    teacher = randn(2, 4, 3, 3, seed=0, requires_grad=True)
    loss = kdfast.functional.paraphraser_reconstruction_loss(paraphraser, teacher)
    torch.testing.assert_close(loss, F.mse_loss(paraphraser(teacher)[1], teacher))
    loss.backward()
    assert teacher.grad is None and paraphraser.encoder[0].weight.grad is not None


def test_pretrain_paraphraser_lowers_the_reconstruction_loss():
    torch.manual_seed(0)
    paraphraser = kdfast.Paraphraser(4, rate=1.0)
    maps = [torch.randn(4, 4, 3, 3) for _ in range(4)]
    optimizer = torch.optim.Adam(paraphraser.parameters(), lr=1e-2)
    history = kdfast.recipes.pretrain_paraphraser(paraphraser, maps, optimizer, epochs=5)
    assert len(history) == 5 and history[-1] < history[0]
    assert not paraphraser.training
    with pytest.raises(ValueError, match="teacher_batches gave no batch"):
        kdfast.recipes.pretrain_paraphraser(paraphraser, [], optimizer)
    with pytest.raises(ValueError, match="epochs must be an int >= 1"):
        kdfast.recipes.pretrain_paraphraser(paraphraser, maps, optimizer, epochs=0)


def test_second_stage_trains_the_translator_on_the_frozen_factor():
    paraphraser, translator = kdfast.Paraphraser(8), kdfast.Translator(4, 8)
    f_s, f_t = torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        factor_t = paraphraser.encode(f_t)
    loss = kdfast.FTLoss()(translator(f_s), factor_t)  # the student's map is pooled to 4x4
    loss.backward()
    assert all(p.grad is not None for p in translator.parameters())


def test_paper_mode_needs_equal_factor_channels():
    with pytest.raises(ValueError, match="mode='paper' compares the whole factors"):
        kdfast.functional.ft_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4),
                                  mode="paper")
