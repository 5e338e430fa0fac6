import pytest
import torch

import kdfast
from kdfast.functional import pkt_loss
from kdfast.reference.pkt import pkt_loss as reference_pkt
from tests.helpers import docstring_example_loss, randn


@pytest.mark.parametrize("example", [pkt_loss, kdfast.PKTLoss])
def test_docstring_example_runs(example):
    assert docstring_example_loss(example) > 0


def test_rows_are_the_reference_and_reductions_act_on_them():
    s, t = randn(5, 7, seed=0), randn(5, 3, seed=1)
    rows = pkt_loss(s, t, reduction="none")
    torch.testing.assert_close(rows, reference_pkt(s, t))
    torch.testing.assert_close(pkt_loss(s, t), rows.mean())
    torch.testing.assert_close(pkt_loss(s, t, reduction="sum"), rows.sum())
    torch.testing.assert_close(kdfast.PKTLoss(eps=1e-5)(s, t), reference_pkt(s, t, 1e-5).mean())


def test_features_of_any_rank_are_flattened_per_sample():
    s, t = randn(4, 2, 3, 5, seed=2), randn(4, 6, seed=3)
    torch.testing.assert_close(pkt_loss(s, t), pkt_loss(s.flatten(1), t))
    torch.testing.assert_close(pkt_loss(s.unsqueeze(2), t), pkt_loss(s, t))


def test_half_inputs_are_computed_in_float32():
    s, t = randn(4, 8, seed=4), randn(4, 8, seed=5)
    out = pkt_loss(s.half(), t.half())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, pkt_loss(s.half().double(), t.half().double()).float(),
                               rtol=1e-5, atol=1e-7)


def test_gradients_reach_both_inputs():
    s = randn(4, 6, seed=6, requires_grad=True)
    t = randn(4, 9, seed=7, requires_grad=True)
    pkt_loss(s, t).backward()
    assert s.grad.abs().sum() > 0 and t.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_no_fused_backend_and_the_error_says_so(backend):
    s, t = randn(3, 4, seed=8), randn(3, 4, seed=9)
    with pytest.raises(ValueError, match=f"backend='{backend}' cannot run pkt"):
        pkt_loss(s, t, backend=backend)
    torch.testing.assert_close(pkt_loss(s, t, backend="reference"), pkt_loss(s, t))


def test_batch_mismatch_names_both_inputs():
    with pytest.raises(ValueError, match="student and teacher must have the same batch size"):
        pkt_loss(torch.randn(3, 4), torch.randn(4, 4))
