import pytest
import torch

import kdfast


def maps(*channels, batch=2):
    return [torch.randn(batch, c, 4, 4) for c in channels]


def test_needs_two_maps_per_side():
    with pytest.raises(ValueError, match="lists of the same length >= 2"):
        kdfast.functional.kdsvd_loss(maps(3), maps(3))
    with pytest.raises(ValueError, match=r"lists of the same length >= 2 .*got 2 and 3"):
        kdfast.functional.kdsvd_loss(maps(3, 4), maps(3, 4, 5))


def test_a_tensor_instead_of_a_list_is_rejected():
    with pytest.raises(TypeError, match="student_features must be a list of"):
        kdfast.functional.kdsvd_loss(torch.randn(2, 3, 4, 4), maps(3, 4))


def test_spatial_sizes_may_differ_between_student_and_teacher():
    student = [torch.randn(2, 3, 8, 8), torch.randn(2, 4, 4, 4)]
    teacher = [torch.randn(2, 3, 4, 4), torch.randn(2, 4, 2, 2)]
    assert torch.isfinite(kdfast.KDSVDLoss(k=2)(student, teacher))
