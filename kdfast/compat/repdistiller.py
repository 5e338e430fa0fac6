"""RepDistiller's ``distiller_zoo`` (and ``crd.criterion.CRDLoss``) on kdfast's losses.

A training script written against RepDistiller (github.com/HobbitLong/RepDistiller) switches
with one changed import::

    from distiller_zoo import *                  # before
    from kdfast.compat.repdistiller import *     # after
    from kdfast.compat.repdistiller import CRDLoss   # for ``from crd.criterion import CRDLoss``

Each class keeps RepDistiller's name, constructor arguments, call signature, return type and
value; the value is computed by the kdfast function named in its docstring (by its fused core
where it has one). The list-taking classes (``Attention``, ``NSTLoss``, ``Similarity``,
``FSP``, ``ABLoss``, ``KDSVD``) return the list of per-layer losses, to be summed by the
caller as in RepDistiller's ``train_distill``.

Where two maps of different sizes meet, RepDistiller adaptive-average-pools the one with the
larger H to (H_small, H_small); the adapters do the same before calling kdfast, so the sizes
kdfast sees are equal and every size pair RepDistiller accepts is accepted.

Known differences, all outside RepDistiller's own use of the classes:

* ``Attention(p)`` with an odd ``p`` on negative features: kdfast's map is mean_c |f|^p (the
  paper); RepDistiller's is mean_c f^p. Equal for even p (the default 2) and for the
  post-ReLU features RepDistiller feeds it.
* ``NSTLoss``: RepDistiller detaches its teacher-teacher term; kdfast keeps its gradient when
  the teacher has one (RepDistiller's loop detaches the teacher features: no difference).
* ``CRDLoss`` moves its memory banks only in training mode; RepDistiller's also in ``eval()``.
  Negatives drawn when ``contrast_idx`` is None are uniform, as RepDistiller's, from another
  random stream.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kdfast
from kdfast import functional as KF
from kdfast.reference.ft import factor_vector

__all__ = [
    "ABLoss", "Attention", "Correlation", "DistillKL", "FSP", "FactorTransfer", "HintLoss",
    "KDSVD", "NSTLoss", "PKT", "RKDLoss", "Similarity", "VIDLoss",
]


def match_by_height(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RepDistiller's size rule: the map with the larger H is adaptive-average-pooled to the
    square (H_small, H_small) of the other; equal H leaves both as they are."""
    a_h, b_h = a.shape[2], b.shape[2]
    if a_h > b_h:
        a = F.adaptive_avg_pool2d(a, (b_h, b_h))
    elif a_h < b_h:
        b = F.adaptive_avg_pool2d(b, (a_h, a_h))
    return a, b


class DistillKL(nn.Module):
    """Hinton KD: T² · KL(p_t ‖ p_s) summed over classes, averaged over the batch
    (:func:`kdfast.functional.kd_loss`). ``T`` is read at each call (a schedule may set it)."""

    def __init__(self, T):
        super().__init__()
        self.T = T

    def forward(self, y_s, y_t):
        return KF.kd_loss(y_s, y_t, temperature=self.T)


class HintLoss(nn.Module):
    """FitNets hint: the mean squared error over all entries (:func:`kdfast.functional.
    fitnet_loss`); the regressor (RepDistiller's ``ConvReg``) is applied by the caller."""

    def forward(self, f_s, f_t):
        return KF.fitnet_loss(f_s, f_t)


class Attention(nn.Module):
    """Attention transfer per layer: ``forward(g_s, g_t)`` returns one scalar per pair of maps,
    the mean over B·HW of the squared difference of the normalised attention maps
    (:func:`kdfast.functional.at_loss`, ``mode="code"``)."""

    def __init__(self, p=2):
        super().__init__()
        self.p = p

    def forward(self, g_s, g_t):
        return [KF.at_loss(*match_by_height(f_s, f_t), p=self.p, mode="code")
                for f_s, f_t in zip(g_s, g_t, strict=False)]


class NSTLoss(nn.Module):
    """Neuron selectivity transfer per layer: ``forward(g_s, g_t)`` returns one scalar per pair,
    the squared MMD with the degree-2 polynomial kernel of the L2-normalised channels, averaged
    over the batch (:func:`kdfast.functional.nst_loss` with its defaults)."""

    def forward(self, g_s, g_t):
        return [KF.nst_loss(*match_by_height(f_s, f_t)) for f_s, f_t in zip(g_s, g_t, strict=False)]


class Similarity(nn.Module):
    """Similarity-preserving KD per layer: ``forward(g_s, g_t)`` returns one tensor of shape
    (1,) per pair, as RepDistiller's ``.view(-1, 1).sum(0)`` does
    (:func:`kdfast.functional.sp_loss`)."""

    def forward(self, g_s, g_t):
        return [KF.sp_loss(f_s, f_t).reshape(1) for f_s, f_t in zip(g_s, g_t, strict=False)]


class RKDLoss(nn.Module):
    """Relational KD: ``w_d`` · distance term + ``w_a`` · angle term
    (:func:`kdfast.functional.rkd_loss`)."""

    def __init__(self, w_d=25, w_a=50):
        super().__init__()
        self.w_d = w_d
        self.w_a = w_a

    def forward(self, f_s, f_t):
        return KF.rkd_loss(f_s, f_t, distance_weight=self.w_d, angle_weight=self.w_a)


class FSP(nn.Module):
    """FSP matrices of consecutive layers: ``forward(g_s, g_t)`` returns one scalar per pair
    (g[i], g[i + 1]), the mean over B·C_i·C_(i+1) of the squared difference of the student's
    and teacher's matrices (:func:`kdfast.functional.fsp_loss`); within a pair the map with
    the larger H is pooled to the other's.

    ``s_shapes`` and ``t_shapes`` (the feature shapes) are only checked, as in RepDistiller:
    equal lengths and equal channel counts layer by layer (``ValueError`` otherwise).
    """

    def __init__(self, s_shapes, t_shapes):
        super().__init__()
        if len(s_shapes) != len(t_shapes):
            raise ValueError(f"unequal length of feat list: {len(s_shapes)} student shapes, "
                             f"{len(t_shapes)} teacher shapes")
        if [s[1] for s in s_shapes] != [t[1] for t in t_shapes]:
            raise ValueError("num of channels not equal (error in FSP)")

    def forward(self, g_s, g_t):
        return [KF.fsp_loss([match_by_height(g_s[i], g_s[i + 1])],
                            [match_by_height(g_t[i], g_t[i + 1])])
                for i in range(min(len(g_s), len(g_t)) - 1)]


class ABLoss(nn.Module):
    """Activation-boundary loss per layer, as RepDistiller scales it: layer i of ``feat_num``
    gets w_i = 2^(i − feat_num + 1) · (batch sum of the alternative L2 loss) / B · 3 / 1000
    (:func:`kdfast.functional.ab_loss`, which gives the sum / B). Inputs are the pre-ReLU
    student maps after RepDistiller's ``Connector`` and the teacher's, of equal shapes."""

    def __init__(self, feat_num, margin=1.0):
        super().__init__()
        self.w = [2 ** (i - feat_num + 1) for i in range(feat_num)]
        self.margin = margin

    def forward(self, g_s, g_t):
        return [w * KF.ab_loss(s, t, margin=self.margin, pool=False) * 3 / 1000
                for w, s, t in zip(self.w, g_s, g_t, strict=False)]


class PKT(nn.Module):
    """Probabilistic knowledge transfer (:func:`kdfast.functional.pkt_loss`)."""

    def forward(self, f_s, f_t):
        return KF.pkt_loss(f_s, f_t)


class Correlation(nn.Module):
    """RepDistiller's correlation congruence: with δ = |f_s − f_t|, the mean over consecutive
    samples of Σ_d δ_i δ_(i+1) (:func:`kdfast.functional.cc_loss`,
    ``variant="repdistiller"``)."""

    def forward(self, f_s, f_t):
        return KF.cc_loss(f_s, f_t, variant="repdistiller")


class VIDLoss(kdfast.VIDLoss):
    """Variational information distillation with its regressor and variance head:
    :class:`kdfast.VIDLoss` under RepDistiller's constructor (same submodules and state-dict
    keys: ``regressor.0/2/4.weight``, ``log_scale``) and its size rule."""

    def __init__(self, num_input_channels, num_mid_channel, num_target_channels,
                 init_pred_var=5.0, eps=1e-5):
        super().__init__(num_input_channels, num_target_channels, num_mid_channel,
                         init_variance=init_pred_var, eps=eps)

    def forward(self, input, target):
        return super().forward(*match_by_height(input, target))


class FactorTransfer(nn.Module):
    """Factor transfer between the translator's and the paraphraser's factors: the mean of
    |φ(f_s) − φ(f_t)|^p2 with φ(f) = normalise(mean_c f^p1) (p2 = 1:
    :func:`kdfast.functional.ft_loss`; any other p2 on kdfast's ``factor_vector``)."""

    def __init__(self, p1=2, p2=1):
        super().__init__()
        self.p1 = p1
        self.p2 = p2

    def forward(self, f_s, f_t):
        f_s, f_t = match_by_height(f_s, f_t)
        if self.p2 == 1:
            return KF.ft_loss(f_s, f_t, power=self.p1)
        diff = factor_vector(f_s, power=self.p1) - factor_vector(f_t, power=self.p1)
        return diff.pow(self.p2).mean()


class KDSVD(nn.Module):
    """KDSVD: ``forward(g_s, g_t)`` returns one scalar per consecutive pair of layers (len − 1
    of them), each the pair's sum of squared RBF differences divided by B
    (:func:`kdfast.functional.kdsvd_loss` on the pair; an inner map's SVD is therefore taken
    twice, for the pair before it and the pair after it)."""

    def __init__(self, k=1):
        super().__init__()
        self.k = k

    def forward(self, g_s, g_t):
        pairs = range(1, min(len(g_s), len(g_t)))
        return [KF.kdsvd_loss(g_s[i - 1:i + 1], g_t[i - 1:i + 1], k=self.k) for i in pairs]


class CRDLoss(kdfast.CRDLoss):
    """Contrastive representation distillation, RepDistiller's ``crd.criterion.CRDLoss(opt)``:
    :class:`kdfast.CRDLoss` built from the same ``opt`` fields — ``s_dim``, ``t_dim``,
    ``feat_dim``, ``n_data``, ``nce_k``, ``nce_t``, ``nce_m`` — with
    ``forward(f_s, f_t, idx, contrast_idx=None)``. ``embed_s`` and ``embed_t`` are the two
    embedding heads (RepDistiller's training script gives them to the optimiser). The loss has
    shape (1,), as RepDistiller's ``ContrastLoss`` returns it."""

    def __init__(self, opt):
        super().__init__(opt.s_dim, opt.t_dim, opt.n_data, feat_dim=opt.feat_dim,
                         nce_k=opt.nce_k, temperature=opt.nce_t, momentum=opt.nce_m)

    def forward(self, f_s, f_t, idx, contrast_idx=None):
        return super().forward(f_s, f_t, idx, contrast_idx).reshape(1)

    @property
    def embed_s(self) -> nn.Module:
        return self.embed_student

    @property
    def embed_t(self) -> nn.Module:
        return self.embed_teacher
