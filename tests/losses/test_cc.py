import pytest
import torch

import kdfast


def test_a_batch_of_one_is_rejected():
    with pytest.raises(ValueError, match="batch size of at least 2"):
        kdfast.functional.cc_loss(torch.randn(1, 4), torch.randn(1, 4))


def test_repdistiller_variant_needs_equal_shapes():
    with pytest.raises(ValueError, match="variant='repdistiller' compares the features"):
        kdfast.functional.cc_loss(torch.randn(3, 4), torch.randn(3, 5), variant="repdistiller")


def test_variants_differ_and_options_are_attributes():
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    loss = kdfast.CCLoss(variant="repdistiller")
    torch.testing.assert_close(loss(s, t), kdfast.functional.cc_loss(s, t, variant="repdistiller"))
    loss.variant = "torchdistill"
    torch.testing.assert_close(loss(s, t), kdfast.functional.cc_loss(s, t))
