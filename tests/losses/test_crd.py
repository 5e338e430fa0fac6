"""CRDLoss's module form (the contract table checks crd_loss; the module embeds raw features
and holds its banks, so it is checked here) and the docstring examples."""

import copy
import pickle

import pytest
import torch

import kdfast
from kdfast.functional import crd_loss
from tests.helpers import docstring_example_loss, randn

INDEX = torch.tensor([4, 0, 7])
CONTRAST = torch.tensor([[4, 1, 2], [0, 5, 19], [7, 7, 3]])


def make_crd(**options):
    torch.manual_seed(0)
    return kdfast.CRDLoss(6, 10, n_data=20, feat_dim=4, nce_k=5, seed=0, **options).double()


def features():
    return randn(3, 6, seed=1), randn(3, 10, seed=2)


def function_on_its_state(crd, fs, ft, **options):
    """crd_loss on the module's heads, banks (at CONTRAST) and Z."""
    return crd_loss(crd.embed_student(fs), crd.embed_teacher(ft), crd.student_memory[CONTRAST],
                    crd.teacher_memory[CONTRAST], crd.n_data,
                    normalizers=tuple(crd.normalizers.tolist()), **options)


@pytest.mark.parametrize("example", [crd_loss, kdfast.CRDLoss])
def test_docstring_example_runs(example):
    docstring_example_loss(example)


def test_options_are_attributes_shown_in_the_repr():
    crd = make_crd(temperature=0.1, momentum=0.3, reduction="sum")
    assert dict(crd.options) == {"temperature": 0.1, "momentum": 0.3, "reduction": "sum",
                                 "backend": None}
    for text in ("temperature=0.1", "momentum=0.3", "reduction='sum'"):
        assert text in repr(crd)
    assert not any(name in crd.state_dict() for name in crd.options)


def test_a_new_temperature_and_reduction_take_effect_at_the_next_call():
    crd = make_crd().eval()  # eval: the banks stay, so both calls see the same state
    fs, ft = features()
    crd(fs, ft, INDEX, CONTRAST)  # sets Z
    crd.temperature, crd.reduction = 0.2, "none"
    out = crd(fs, ft, INDEX, CONTRAST)
    assert out.shape == (3,)
    torch.testing.assert_close(out, function_on_its_state(crd, fs, ft, temperature=0.2,
                                                          reduction="none"))
    crd.reduction = "sum"
    torch.testing.assert_close(crd(fs, ft, INDEX, CONTRAST), out.sum())


@pytest.mark.parametrize("name,value,match", [
    ("temperature", 0.0, "temperature must be > 0"),
    ("momentum", 1.0, r"momentum must be in \[0, 1\)"),
    ("momentum", -0.5, "momentum must be >= 0"),
    ("reduction", "avg", "reduction must be one of"),
    ("backend", "gpu", "backend must be one of")])
def test_a_bad_value_fails_at_construction_and_assignment_and_keeps_the_old_one(name, value,
                                                                                 match):
    with pytest.raises(ValueError, match=match):
        make_crd(**{name: value})
    crd = make_crd()
    old = getattr(crd, name)
    with pytest.raises(ValueError, match=match):
        setattr(crd, name, value)
    assert getattr(crd, name) == old


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_no_fused_backend(backend):
    fs, ft = features()
    with pytest.raises(ValueError, match=f"backend='{backend}' cannot run crd"):
        make_crd(backend=backend)(fs, ft, INDEX, CONTRAST)
    crd, reference = make_crd().eval(), make_crd(backend="reference").eval()
    torch.testing.assert_close(crd(fs, ft, INDEX, CONTRAST), reference(fs, ft, INDEX, CONTRAST))


def test_copy_and_pickle_keep_the_state_and_the_options():
    crd = make_crd(temperature=0.1)
    fs, ft = features()
    crd(fs, ft, INDEX)  # Z set, banks moved, the sampler advanced
    for clone in (copy.deepcopy(crd), pickle.loads(pickle.dumps(crd))):
        assert dict(clone.options) == dict(crd.options)
        for key, value in crd.state_dict().items():
            assert torch.equal(clone.state_dict()[key], value), key
    twin = copy.deepcopy(crd)
    torch.testing.assert_close(twin(fs, ft, INDEX), crd(fs, ft, INDEX))  # same negatives drawn
