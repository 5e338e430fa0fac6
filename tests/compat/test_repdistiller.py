"""kdfast.compat.repdistiller against RepDistiller's formulas.

The ``rd_*`` functions below are small independent transcriptions of the formulas of
RepDistiller's ``distiller_zoo`` and ``crd`` (github.com/HobbitLong/RepDistiller), written for
this test from reading that code — not copied, and not using kdfast — so that the adapters are
checked against what a RepDistiller user's script computes today.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdfast
import kdfast.compat.repdistiller as rd
from kdfast import functional as KF
from tests.helpers import assert_rel_close, randn

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "repdistiller_step.py"
ZOO_NAMES = ["ABLoss", "Attention", "Correlation", "DistillKL", "FSP", "FactorTransfer",
             "HintLoss", "KDSVD", "NSTLoss", "PKT", "RKDLoss", "Similarity", "VIDLoss"]
TOL = 1e-10


# ---- transcriptions of RepDistiller's formulas (see the module docstring) ----

def rd_pool(a, b):
    if a.shape[2] > b.shape[2]:
        a = F.adaptive_avg_pool2d(a, (b.shape[2],) * 2)
    elif a.shape[2] < b.shape[2]:
        b = F.adaptive_avg_pool2d(b, (a.shape[2],) * 2)
    return a, b


def rd_kl(y_s, y_t, T):
    log_p_s = torch.log_softmax(y_s / T, 1)
    p_t = torch.softmax(y_t / T, 1)
    return (p_t * (p_t.log() - log_p_s)).sum() * T * T / y_s.shape[0]


def rd_at(f_s, f_t, p=2):
    f_s, f_t = rd_pool(f_s, f_t)
    def amap(f):
        return F.normalize(f.pow(p).mean(1).flatten(1))
    return (amap(f_s) - amap(f_t)).pow(2).mean()


def rd_nst(f_s, f_t):
    f_s, f_t = rd_pool(f_s, f_t)
    x = F.normalize(f_s.flatten(2), dim=2)
    y = F.normalize(f_t.flatten(2), dim=2)
    def k(a, b):
        return (a @ b.transpose(1, 2)).pow(2).mean()
    return k(y, y) + k(x, x) - 2 * k(x, y)


def rd_sp(f_s, f_t):
    b = f_s.shape[0]
    def gram(f):
        f = f.reshape(b, -1)
        return F.normalize(f @ f.t())
    return ((gram(f_t) - gram(f_s)) ** 2).sum().reshape(1) / (b * b)


def rd_pdist(e):
    d2 = (e.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * e @ e.t()).clamp(min=1e-12)
    d = d2.sqrt().clone()
    d.fill_diagonal_(0)
    return d


def rd_rkd(f_s, f_t, w_d=25, w_a=50):
    s, t = f_s.flatten(1), f_t.flatten(1)
    d_t, d_s = rd_pdist(t), rd_pdist(s)
    d_t, d_s = d_t / d_t[d_t > 0].mean(), d_s / d_s[d_s > 0].mean()
    def angles(e):
        u = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), dim=2)
        return (u @ u.transpose(1, 2)).flatten()
    return (w_d * F.smooth_l1_loss(d_s, d_t)
            + w_a * F.smooth_l1_loss(angles(s), angles(t)))


def rd_fsp_matrices(g):
    out = []
    for lower, upper in zip(g[:-1], g[1:], strict=True):
        lower, upper = rd_pool(lower, upper)
        out.append(torch.einsum("bik,bjk->bji", lower.flatten(2), upper.flatten(2))
                   / lower.shape[2] / lower.shape[3])
    return out


def rd_fsp(g_s, g_t):
    return [(s - t).pow(2).mean() for s, t in
            zip(rd_fsp_matrices(g_s), rd_fsp_matrices(g_t), strict=True)]


def rd_ab(g_s, g_t, margin=1.0):
    n, bsz = len(g_s), g_s[0].shape[0]
    out = []
    for i, (s, t) in enumerate(zip(g_s, g_t, strict=True)):
        neg = ((s > -margin) & (t <= 0)).to(s.dtype) * (s + margin) ** 2
        pos = ((s <= margin) & (t > 0)).to(s.dtype) * (s - margin) ** 2
        out.append(2.0 ** (i - n + 1) * (neg + pos).sum() / bsz / 1000 * 3)
    return out


def rd_pkt(f_s, f_t, eps=1e-7):
    def probs(x):
        x = x / (x.norm(dim=1, keepdim=True) + eps)
        k = (x @ x.t() + 1) / 2
        return k / k.sum(1, keepdim=True)
    p_s, p_t = probs(f_s), probs(f_t)
    return (p_t * ((p_t + eps) / (p_s + eps)).log()).mean()


def rd_cc(f_s, f_t):
    d = (f_s - f_t).abs()
    return (d[:-1] * d[1:]).sum(1).mean()


def rd_ft(f_s, f_t, p1=2, p2=1):
    f_s, f_t = rd_pool(f_s, f_t)
    def factor(f):
        return F.normalize(f.pow(p1).mean(1).flatten(1))
    diff = factor(f_s) - factor(f_t)
    return diff.abs().mean() if p2 == 1 else diff.pow(p2).mean()


def rd_vid(loss_module, x, y):
    x, y = rd_pool(x, y)
    mean = loss_module.regressor(x)
    var = (torch.log(1 + torch.exp(loss_module.log_scale)) + loss_module.eps).view(1, -1, 1, 1)
    return (0.5 * ((mean - y) ** 2 / var + var.log())).mean()


def rd_kdsvd(g_s, g_t, k=1):
    def top(f, n):
        b, c, h, _ = f.shape
        _, s, v = torch.svd(f.reshape(b, c, h * h).transpose(1, 2))
        return F.normalize(s[:, :n], dim=1), F.normalize(v[:, :, :n], dim=1)
    losses, prev = [], None
    for f_s, f_t in zip(g_s, g_t, strict=True):
        s_t, v_t = top(f_t, k)
        _, v_s = top(f_s, k + 3)
        cos = v_s.transpose(1, 2) @ v_t
        best = cos.abs().amax(1, keepdim=True)
        v_s = v_s @ torch.where(best == cos.abs(), cos.sign(), torch.zeros_like(cos))
        v_s, v_t = v_s * s_t.unsqueeze(1), v_t * s_t.unsqueeze(1)
        if prev is not None:
            def rbf(a, b):
                return torch.exp(-(a.unsqueeze(2) - b.unsqueeze(1)).pow(2) / 8)
            diff = (rbf(v_s, prev[0]) - rbf(v_t, prev[1])).pow(2)
            losses.append(torch.where(diff.isfinite(), diff, 0).sum() / g_s[0].shape[0])
        prev = (v_s, v_t)
    return losses


class RdCRD:
    """CRD's heads, two momentum banks, Z set at the first batch and the NCE loss (eq. 18)."""

    def __init__(self, crd: rd.CRDLoss, opt) -> None:
        self.heads = crd.embed_s, crd.embed_t
        self.banks = [crd.student_memory.clone(), crd.teacher_memory.clone()]
        self.z, self.opt = None, opt

    def nce(self, p):
        m, n = p.shape[1] - 1, self.opt.n_data
        pos = (p[:, 0] / (p[:, 0] + m / n + 1e-7)).log()
        neg = ((m / n) / (p[:, 1:] + m / n + 1e-7)).log()
        return -(pos.sum() + neg.sum()) / p.shape[0]

    def __call__(self, f_s, f_t, idx, contrast_idx):
        with torch.no_grad():
            e = [h.linear(f.flatten(1)) for h, f in zip(self.heads, (f_s, f_t), strict=True)]
            e = [x / x.pow(2).sum(1, keepdim=True).sqrt() for x in e]
            scores = [torch.exp(self.banks[1][contrast_idx] @ e[0].unsqueeze(2) / self.opt.nce_t),
                      torch.exp(self.banks[0][contrast_idx] @ e[1].unsqueeze(2) / self.opt.nce_t)]
            if self.z is None:
                self.z = [float(s.mean()) * self.opt.n_data for s in scores]
            loss = sum(self.nce((s / z).squeeze(2)) for s, z in zip(scores, self.z, strict=True))
            for bank, x in zip(self.banks, e, strict=True):
                moved = bank[idx] * self.opt.nce_m + x * (1 - self.opt.nce_m)
                bank[idx] = moved / moved.norm(dim=1, keepdim=True)
        return loss


# ---- names and hand cases ----

def test_star_import_exports_exactly_the_distiller_zoo_names():
    namespace: dict = {}
    exec("from kdfast.compat.repdistiller import *", namespace)
    assert sorted(k for k in namespace if not k.startswith("__")) == sorted(ZOO_NAMES)
    assert sorted(rd.__all__) == sorted(ZOO_NAMES)
    assert issubclass(rd.CRDLoss, kdfast.CRDLoss) and issubclass(rd.VIDLoss, kdfast.VIDLoss)


def test_hand_cases():
    y = torch.tensor([[1.0, 2.0, 3.0]])
    assert float(rd.DistillKL(4)(y, y)) == pytest.approx(0.0, abs=1e-7)
    # one sample, teacher puts all mass on class 0 at T=1: KL = -log p_s(0)
    y_s, y_t = torch.zeros(1, 2), torch.tensor([[100.0, -100.0]])
    assert float(rd.DistillKL(1)(y_s, y_t)) == pytest.approx(math.log(2), rel=1e-6)
    assert float(rd.HintLoss()(torch.zeros(2, 3), torch.ones(2, 3))) == pytest.approx(1.0)
    f = torch.rand(2, 3, 4, 4)
    (sp,) = rd.Similarity()([f], [2 * f])
    assert sp.shape == (1,) and float(sp) == pytest.approx(0.0, abs=1e-7)
    assert all(float(x) == pytest.approx(0.0, abs=1e-7) for x in rd.Attention()([f], [f]))
    # AB, one layer, margin 1: s = 0, t = +1 -> (0 - 1)^2 per entry; weight 2^0, /B, *3/1000
    (ab,) = rd.ABLoss(1)([torch.zeros(2, 1, 1, 3)], [torch.ones(2, 1, 1, 3)])
    assert float(ab) == pytest.approx(3 * 1.0 * 3 / 1000)
    assert rd.ABLoss(3).w == [0.25, 0.5, 1]


def test_fsp_checks_its_shapes_as_repdistiller():
    with pytest.raises(ValueError, match="length"):
        rd.FSP([(2, 4, 8, 8)], [(2, 4, 8, 8), (2, 8, 4, 4)])
    with pytest.raises(ValueError, match="channels"):
        rd.FSP([(2, 4, 8, 8)], [(2, 8, 8, 8)])


def test_options_are_read_at_each_call():
    y_s, y_t = randn(4, 10, seed=1), randn(4, 10, seed=2)
    criterion = rd.DistillKL(4)
    criterion.T = 2.0
    assert_rel_close(criterion(y_s, y_t), rd_kl(y_s, y_t, 2.0), TOL)


# ---- every class against the transcription and against kdfast ----

def maps(seed, b=4, channels=(4, 8, 8), sizes=(8, 4, 2)):
    return [randn(b, c, h, h, seed=seed + i) for i, (c, h) in enumerate(zip(channels, sizes,
                                                                           strict=True))]


def consecutive(g):
    return list(zip(g[:-1], g[1:], strict=True))


def assert_lists_close(out, ref):
    assert isinstance(out, list) and len(out) == len(ref)
    for o, r in zip(out, ref, strict=True):
        assert o.shape == r.shape
        assert_rel_close(o, r, TOL)


def test_list_losses_match_the_transcription():
    g_s, g_t = maps(10), maps(20, channels=(6, 16, 8), sizes=(16, 4, 1))
    assert_lists_close(rd.Attention()(g_s, g_t), list(map(rd_at, g_s, g_t)))
    assert_lists_close(rd.Attention(p=4)(g_s, g_t),
                       [rd_at(s, t, p=4) for s, t in zip(g_s, g_t, strict=True)])
    assert_lists_close(rd.NSTLoss()(g_s, g_t), list(map(rd_nst, g_s, g_t)))
    assert_lists_close(rd.Similarity()(g_s, g_t), list(map(rd_sp, g_s, g_t)))
    same = maps(30)  # FSP, AB and KDSVD compare channels one to one
    assert_lists_close(rd.FSP([x.shape for x in g_s], [x.shape for x in same])(g_s, same),
                       rd_fsp(g_s, same))
    assert_lists_close(rd.ABLoss(3, margin=0.5)(g_s, same), rd_ab(g_s, same, margin=0.5))
    assert_lists_close(rd.KDSVD()(g_s, same), rd_kdsvd(g_s, same))
    assert_lists_close(rd.KDSVD(k=2)(g_s, same), rd_kdsvd(g_s, same, k=2))


def test_list_losses_equal_kdfast_functions_per_layer():
    g_s, g_t = maps(40), maps(50, channels=(4, 8, 8), sizes=(8, 8, 4))
    for out, s, t in zip(rd.Attention()(g_s, g_t), g_s, g_t, strict=True):
        assert_rel_close(out, KF.at_loss(s, t), TOL)
    for out, s, t in zip(rd.NSTLoss()(g_s, g_t), g_s, g_t, strict=True):
        assert_rel_close(out, KF.nst_loss(s, t), TOL)
    fsp = rd.FSP([x.shape for x in g_s], [x.shape for x in g_t])(g_s, g_t)
    assert_rel_close(sum(fsp), KF.fsp_loss(consecutive(g_s), consecutive(g_t)), TOL)
    assert_rel_close(sum(rd.KDSVD()(g_s, g_t)), KF.kdsvd_loss(g_s, g_t), TOL)
    same = maps(55)  # AB takes the connector's output: the teacher's shapes
    ab = rd.ABLoss(3)(g_s, same)
    for i, (out, s, t) in enumerate(zip(ab, g_s, same, strict=True)):
        assert_rel_close(out, 2.0 ** (i - 2) * KF.ab_loss(s, t) * 3 / 1000, TOL)


def test_single_pair_losses_match_the_transcription():
    e_s, e_t = randn(8, 12, seed=60), randn(8, 20, seed=61)
    assert_rel_close(rd.RKDLoss()(e_s, e_t), rd_rkd(e_s, e_t), TOL)
    assert_rel_close(rd.RKDLoss(w_d=1, w_a=2)(e_s, e_t), rd_rkd(e_s, e_t, 1, 2), TOL)
    assert_rel_close(rd.PKT()(e_s, e_t), rd_pkt(e_s, e_t), TOL)
    e_t2 = randn(8, 12, seed=62)
    assert_rel_close(rd.Correlation()(e_s, e_t2), rd_cc(e_s, e_t2), TOL)
    assert_rel_close(rd.HintLoss()(e_s, e_t2), F.mse_loss(e_s, e_t2), TOL)
    y_s, y_t = randn(8, 100, seed=63), randn(8, 100, seed=64)
    assert_rel_close(rd.DistillKL(4)(y_s, y_t), rd_kl(y_s, y_t, 4), TOL)
    f_s, f_t = randn(4, 6, 8, 8, seed=65), randn(4, 3, 4, 4, seed=66)
    assert_rel_close(rd.FactorTransfer()(f_s, f_t), rd_ft(f_s, f_t), TOL)
    assert_rel_close(rd.FactorTransfer(p1=1, p2=2)(f_s, f_t), rd_ft(f_s, f_t, 1, 2), TOL)
    assert_rel_close(rd.FactorTransfer()(f_s, f_t), KF.ft_loss(f_s, f_t), TOL)
    torch.manual_seed(0)
    vid = rd.VIDLoss(6, 5, 3, init_pred_var=2.0).double()
    assert sorted(vid.state_dict()) == ["log_scale", "regressor.0.weight",
                                        "regressor.2.weight", "regressor.4.weight"]
    assert vid.regressor[0].out_channels == 5
    assert_rel_close(vid(f_s, f_t), rd_vid(vid, f_s, f_t), TOL)
    g = randn(4, 6, 6, 6, seed=67)  # 6 -> 4 is no whole multiple: adaptive pooling
    assert_rel_close(vid(g, f_t), rd_vid(vid, g, f_t), TOL)


def crd_opt(**fields):
    base = dict(s_dim=12, t_dim=20, feat_dim=8, nce_k=5, nce_t=0.07, nce_m=0.5, n_data=32)
    return SimpleNamespace(**{**base, **fields})


def test_crd_reads_opt_and_matches_the_transcription_over_steps():
    torch.manual_seed(0)
    opt = crd_opt()
    crd = rd.CRDLoss(opt).double()
    assert crd.nce_k == 5 and crd.n_data == 32 and crd.temperature == 0.07
    assert crd.embed_s is crd.embed_student and crd.embed_t.linear.in_features == 20
    ref = RdCRD(crd, opt)
    for step in range(3):
        f_s, f_t = randn(6, 12, seed=70 + step), randn(6, 20, seed=80 + step)
        idx = torch.randperm(32, generator=torch.Generator().manual_seed(step))[:6]
        contrast_idx = torch.randint(32, (6, 6), generator=torch.Generator().manual_seed(9))
        contrast_idx[:, 0] = idx
        expected = ref(f_s, f_t, idx, contrast_idx)
        out = crd(f_s, f_t, idx, contrast_idx)
        assert out.shape == (1,)  # RepDistiller's ContrastLoss returns (1,)
        assert_rel_close(out, expected.reshape(1), 1e-9)
        torch.testing.assert_close(crd.student_memory, ref.banks[0])
        torch.testing.assert_close(crd.teacher_memory, ref.banks[1])
    assert crd(f_s, f_t, idx).shape == (1,)  # negatives drawn when contrast_idx is None


# ---- RepDistiller's train_student.py set-up, as the example builds it ----

def load_example():
    spec = importlib.util.spec_from_file_location("repdistiller_step", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def float64_default():
    """The example's nets and batches in float64, so that values compare to ~1e-10."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("distill", ["kd", "attention", "nst", "similarity", "crd", "vid"])
def test_train_student_setup_gives_the_transcriptions_values(distill, float64_default):
    example = load_example()
    torch.manual_seed(0)
    opt = example.make_opt(distill)
    model_s, model_t = example.TinyNet(4), example.TinyNet(8)
    module_list, criterion_list, trainable_list = example.build(opt, model_s, model_t)
    assert isinstance(criterion_list, nn.ModuleList) and len(criterion_list) == 3
    criterion_cls, criterion_div, criterion_kd = criterion_list
    batch = example.random_batch(opt)
    input, target, index, contrast_idx = batch
    model_s.train()
    model_t.eval()
    ref_crd = RdCRD(criterion_kd, opt) if distill == "crd" else None
    if distill == "crd":  # the heads are trained: module_list / trainable_list hold them
        assert module_list[1] is criterion_kd.embed_s and module_list[2] is criterion_kd.embed_t
        assert trainable_list[1] is criterion_kd.embed_s
    feat_s, logit_s = model_s(input, is_feat=True)
    with torch.no_grad():
        feat_t, logit_t = model_t(input, is_feat=True)
    loss_div = criterion_div(logit_s, logit_t)
    assert_rel_close(loss_div, rd_kl(logit_s, logit_t, opt.kd_T), TOL)
    g_s, g_t = feat_s[1:-1], feat_t[1:-1]
    if distill == "kd":
        loss_kd, expected = criterion_kd(logit_s, logit_t), rd_kl(logit_s, logit_t, opt.kd_T)
    elif distill == "attention":
        loss_kd, expected = sum(criterion_kd(g_s, g_t)), sum(map(rd_at, g_s, g_t))
    elif distill == "nst":
        loss_kd, expected = sum(criterion_kd(g_s, g_t)), sum(map(rd_nst, g_s, g_t))
    elif distill == "similarity":
        loss_kd = sum(criterion_kd([feat_s[-2]], [feat_t[-2]]))
        expected = rd_sp(feat_s[-2], feat_t[-2])
        assert loss_kd.shape == (1,)
    elif distill == "vid":
        loss_kd = sum(c(s, t) for s, t, c in zip(g_s, g_t, criterion_kd, strict=True))
        expected = sum(rd_vid(c, s, t) for s, t, c in zip(g_s, g_t, criterion_kd, strict=True))
        assert trainable_list[-1] is criterion_kd
    else:
        expected = ref_crd(feat_s[-1], feat_t[-1], index, contrast_idx)
        loss_kd = criterion_kd(feat_s[-1], feat_t[-1], index, contrast_idx)
    assert_rel_close(loss_kd.reshape(-1), expected.reshape(-1), 1e-9)
    loss = opt.gamma * criterion_cls(logit_s, target) + opt.alpha * loss_div + opt.beta * loss_kd
    loss.backward()  # a (1,)-shaped total (similarity, crd) backpropagates as in RepDistiller
    assert model_s.stem.weight.grad is not None


def test_example_runs():
    out = subprocess.run([sys.executable, str(EXAMPLE)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert out.returncode == 0, out.stderr
    for distill in load_example().DISTILLS:
        assert distill in out.stdout


@pytest.mark.parametrize("name", ["Attention", "NSTLoss", "Similarity", "FSP", "KDSVD"])
def test_list_loss_student_gradients_match_the_transcription(name):
    g_t = maps(90)
    g_s = [x.requires_grad_() for x in maps(95)]
    criterion = (rd.FSP([x.shape for x in g_s], [x.shape for x in g_t]) if name == "FSP"
                 else getattr(rd, name)())
    transcription = {"Attention": lambda s, t: list(map(rd_at, s, t)),
                     "NSTLoss": lambda s, t: list(map(rd_nst, s, t)),
                     "Similarity": lambda s, t: list(map(rd_sp, s, t)),
                     "FSP": rd_fsp, "KDSVD": rd_kdsvd}[name]
    grads = torch.autograd.grad(sum(criterion(g_s, g_t)).sum(), g_s)
    expected = torch.autograd.grad(sum(transcription(g_s, g_t)).sum(), g_s)
    for out, ref in zip(grads, expected, strict=True):
        assert_rel_close(out, ref, 1e-8)
