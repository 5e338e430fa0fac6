import math

import pytest
import torch
import torch.nn.functional as F

import kdfast
from kdfast.functional import crd_loss
from kdfast.reference import crd as reference
from tests.helpers import randn


def unit(*shape, seed):
    return F.normalize(randn(*shape, seed=seed), dim=-1)


def test_nce_hand_computed():
    # K = 1, n_data = 2: noise 1/2; P = (1/2, 1/2): -log(1/2 / 1) - log(1/2 / 1) = 2 log 2
    p = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(reference.nce_loss(p, n_data=2),
                               torch.tensor([2 * math.log(2 + 2e-7)], dtype=torch.float64))


def test_crd_hand_computed_in_one_dimension():
    # feat_dim 1: embeddings +-1. student 1 against teacher rows (1, -1): P = (e, 1/e) with
    # T = 1, Z = 1; teacher -1 against student rows (1, 1): P = (1/e, 1/e). n_data 4: noise 1/4.
    s, t = torch.tensor([[1.0]], dtype=torch.float64), torch.tensor([[-1.0]], dtype=torch.float64)
    s_bank = torch.tensor([[[1.0], [1.0]]], dtype=torch.float64)
    t_bank = torch.tensor([[[1.0], [-1.0]]], dtype=torch.float64)
    eps, nu, e = 1e-7, 0.25, math.e

    def h(p0, p1):
        return -math.log(p0 / (p0 + nu + eps)) - math.log(nu / (p1 + nu + eps))

    expected = h(e, 1 / e) + h(1 / e, 1 / e)
    out = reference.crd_loss(s, t, s_bank, t_bank, 4, 1.0, 1.0, 1.0)
    torch.testing.assert_close(out, torch.tensor([expected], dtype=torch.float64))
    torch.testing.assert_close(crd_loss(s, t, s_bank, t_bank, 4, temperature=1.0,
                                        normalizers=(1.0, 1.0)), out[0])


def test_estimated_normalizers_are_n_data_times_the_mean_exp_score():
    s, t = unit(3, 5, seed=0), unit(3, 5, seed=1)
    s_bank, t_bank = randn(3, 4, 5, seed=2), randn(3, 4, 5, seed=3)
    z_s = torch.exp(torch.einsum("bkd,bd->bk", t_bank, s) / 0.07).mean() * 100
    z_t = torch.exp(torch.einsum("bkd,bd->bk", s_bank, t) / 0.07).mean() * 100
    torch.testing.assert_close(
        crd_loss(s, t, s_bank, t_bank, 100),
        crd_loss(s, t, s_bank, t_bank, 100, normalizers=(z_s.item(), z_t.item())))


def test_gradcheck():
    s = unit(2, 3, seed=4).requires_grad_()
    t = unit(2, 3, seed=5).requires_grad_()
    s_bank = randn(2, 4, 3, seed=6, requires_grad=True)
    t_bank = randn(2, 4, 3, seed=7, requires_grad=True)

    def loss(*inputs):
        return reference.crd_loss(*inputs, 10, 0.5, 3.0, 2.0)

    assert torch.autograd.gradcheck(loss, (s, t, s_bank, t_bank))
    assert torch.autograd.gradgradcheck(loss, (s, t, s_bank, t_bank))


def test_function_errors():
    s, t = unit(2, 3, seed=0), unit(2, 3, seed=1)
    bank = randn(2, 4, 3, seed=2)
    with pytest.raises(ValueError, match=r"student_bank must be \(B, K \+ 1, feat_dim\) = "
                                         r"\(B, K \+ 1, 3\)"):
        crd_loss(s, t, randn(2, 4, 5), bank, 10)
    with pytest.raises(ValueError, match="student_bank and teacher_bank must have the same"):
        crd_loss(s, t, bank, randn(2, 5, 3), 10)
    with pytest.raises(TypeError, match="n_data must be an int"):
        crd_loss(s, t, bank, bank, 10.0)
    with pytest.raises(ValueError, match="n_data must be >= 1"):
        crd_loss(s, t, bank, bank, 0)


def make_crd(seed=0, **options):
    torch.manual_seed(seed)
    return kdfast.CRDLoss(6, 10, n_data=20, feat_dim=4, nce_k=5, seed=seed, **options).double()


def test_module_is_the_function_on_its_heads_and_banks_then_moves_the_banks():
    crd = make_crd()
    fs, ft = randn(3, 6, seed=1), randn(3, 2, 5, seed=2)
    index = torch.tensor([4, 0, 7])
    contrast = torch.tensor([[4, 1, 2], [0, 5, 19], [7, 7, 3]])
    s, t = crd.embed_student(fs), crd.embed_teacher(ft)
    old_s, old_t = crd.student_memory.clone(), crd.teacher_memory.clone()
    out = crd(fs, ft, index, contrast)
    torch.testing.assert_close(
        out, crd_loss(s, t, old_s[contrast], old_t[contrast], 20,
                      normalizers=tuple(crd.normalizers.tolist())))
    z_s = torch.exp(torch.einsum("bkd,bd->bk", old_t[contrast], s) / 0.07).mean() * 20
    torch.testing.assert_close(crd.normalizers[0], z_s.detach())
    moved = F.normalize(0.5 * old_s[index] + 0.5 * s.detach(), dim=1)
    torch.testing.assert_close(crd.student_memory[index], moved)
    untouched = [i for i in range(20) if i not in index.tolist()]
    assert torch.equal(crd.student_memory[untouched], old_s[untouched])
    torch.testing.assert_close(crd.teacher_memory[index],
                               F.normalize(0.5 * old_t[index] + 0.5 * t.detach(), dim=1))
    out.backward()
    assert crd.embed_student.linear.weight.grad is not None
    z = crd.normalizers.clone()
    crd(fs, ft, index, contrast)
    assert torch.equal(crd.normalizers, z)  # set once, on the first batch


def test_eval_mode_leaves_the_banks_alone():
    crd = make_crd().eval()
    memory = crd.student_memory.clone()
    crd(randn(2, 6, seed=1), randn(2, 10, seed=2), torch.tensor([1, 2]))
    assert torch.equal(crd.student_memory, memory)


def test_sampling_is_seeded_uniform_and_puts_the_positive_first():
    a, b, c = make_crd(seed=3), make_crd(seed=3), make_crd(seed=4)
    index = torch.tensor([5, 6])
    first = a.sample_contrast_index(index)
    assert first.shape == (2, 6) and torch.equal(first[:, 0], index)
    assert torch.equal(first, b.sample_contrast_index(index))
    assert not torch.equal(a.sample_contrast_index(index), first)  # the state advanced
    assert not torch.equal(c.sample_contrast_index(index), first)
    many = make_crd().sample_contrast_index(torch.zeros(4000, dtype=torch.long))[:, 1:]
    counts = torch.bincount(many.flatten(), minlength=20).double()
    assert counts.min() > 0.9 * counts.mean() and counts.max() < 1.1 * counts.mean()


def test_state_dict_round_trip_resumes_exactly():
    fs, ft = randn(3, 6, seed=1), randn(3, 10, seed=2)
    index = torch.tensor([1, 2, 3])
    crd = make_crd()
    crd(fs, ft, index)
    state = {k: v.clone() for k, v in crd.state_dict().items()}
    assert {"student_memory", "teacher_memory", "normalizers", "sampler_state"} <= set(state)
    resumed = make_crd(seed=9)
    resumed.load_state_dict(state)
    torch.testing.assert_close(resumed(fs, ft, index), crd(fs, ft, index))
    torch.testing.assert_close(resumed.student_memory, crd.student_memory)


def test_module_errors():
    crd = make_crd()
    fs, ft = randn(2, 6), randn(2, 10)
    with pytest.raises(ValueError, match=r"index must be dataset indices in \[0, 19\]"):
        crd(fs, ft, torch.tensor([0, 20]))
    with pytest.raises(TypeError, match="index must hold integer dataset indices"):
        crd(fs, ft, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"contrast_index must be \(B, K \+ 1\)"):
        crd(fs, ft, torch.tensor([0, 1]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        crd.momentum = 1.0
    with pytest.raises(ValueError, match="temperature must be > 0"):
        make_crd(temperature=0.0)
    with pytest.raises(ValueError, match="nce_k must be a positive int"):
        kdfast.CRDLoss(6, 10, 20, nce_k=0)


def test_matches_torchdistill_over_two_steps():
    mid_level = pytest.importorskip("torchdistill.losses.mid_level",
                                    reason="torchdistill is the published CRD to compare with")
    crd = make_crd().float()
    peer = mid_level.CRDLoss("norm", "empty", "norm", input_size=4, output_size=20,
                             num_negative_samples=5, num_samples=20)
    peer.memory_v1.copy_(crd.student_memory)  # v1: the student's bank
    peer.memory_v2.copy_(crd.teacher_memory)
    for step in range(2):
        fs, ft = randn(3, 6, seed=step).float(), randn(3, 10, seed=10 + step).float()
        index = torch.tensor([2, 9, 13]) + step
        contrast = torch.cat([index[:, None], torch.randint(20, (3, 5))], dim=1)
        with torch.no_grad():
            s, t = crd.embed_student(fs), crd.embed_teacher(ft)
        expected = peer({"norm": {"output": s},
                         "empty": {"input": {"pos_idx": index, "contrast_idx": contrast}}},
                        {"norm": {"output": t}})
        torch.testing.assert_close(crd(fs, ft, index, contrast), expected.squeeze())
        torch.testing.assert_close(crd.student_memory, peer.memory_v1)
        torch.testing.assert_close(crd.teacher_memory, peer.memory_v2)
