"""The contract every public loss shares, checked once over a table of losses.

Each ``Case`` says how to call a loss (``function`` on ``arguments(*tensors)``), how to make
valid inputs, and what its error messages call each input. The tests below break one input
at a time (not a tensor, integer dtype, wrong rank, empty, other batch, other device, other
channels, spatial sizes that cannot be matched) and assert that the message names that input
and the fix; then layouts, reductions, option checks, the module form and the backend policy.
Loss-specific checks (references, hand cases, identities) stay in the per-loss files.
"""

from __future__ import annotations

import copy
import fractions
import inspect
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch import nn

import kdfast
from kdfast import backends
from kdfast.losses.ab import ab_loss
from kdfast.losses.adversarial import adversarial_student_loss, discriminator_loss
from kdfast.losses.attention import at_loss
from kdfast.losses.ban import ban_generation_loss
from kdfast.losses.cc import cc_loss
from kdfast.losses.crd import crd_loss
from kdfast.losses.cwd import cwd_loss
from kdfast.losses.dist import dist_loss
from kdfast.losses.dkd import dkd_loss
from kdfast.losses.dml import dml_loss
from kdfast.losses.fitnet import fitnet_loss
from kdfast.losses.fsp import fsp_loss
from kdfast.losses.ft import ft_loss
from kdfast.losses.fused_linear_kd import fused_linear_kd_loss
from kdfast.losses.gradient_attention import gradient_at_loss
from kdfast.losses.kd import kd_loss
from kdfast.losses.kdsvd import kdsvd_loss
from kdfast.losses.lskd import lskd_loss
from kdfast.losses.mgd import make_generation_block, mgd_loss
from kdfast.losses.nst import nst_loss
from kdfast.losses.ofd import ofd_loss, ofd_margin
from kdfast.losses.pkd import pkd_loss
from kdfast.losses.pkt import pkt_loss
from kdfast.losses.reviewkd import hcl_loss
from kdfast.losses.rkd import rkd_loss
from kdfast.losses.sp import sp_loss
from kdfast.losses.srd import srd_loss
from kdfast.losses.vid import vid_loss
from kdfast.losses.wsld import wsld_loss
from tests.helpers import REDUCTIONS, assert_rel_close, randn, reduced

FEATURES = "4-D (B, C, H, W)"
LOGITS = "2-D (B, num_classes)"
ANY_RANK = "2-D or 3-D or 4-D or 5-D (B, ...)"
EMBEDDINGS = "2-D or 3-D or 4-D or 5-D (B, D) or (B, ...)"
FUSED_BACKENDS = ("native", "triton")

with torch.random.fork_rng():  # fixed modules without disturbing the global generator
    torch.manual_seed(0)
    DISCRIMINATOR = kdfast.ConditionalDiscriminator(4, hidden=8).double()
    STUDENT_NET = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    TEACHER_NET = nn.Linear(4, 3).double().requires_grad_(False)
    MGD_GENERATION = make_generation_block(5).double()
    MGD_ALIGN = nn.Conv2d(3, 5, kernel_size=1).double()
    OFD_BN = nn.BatchNorm2d(3).double()  # the teacher BatchNorm behind OFDLoss's margins
    with torch.no_grad():
        OFD_BN.weight.copy_(torch.tensor([0.5, -1.0, 2.0]))
        OFD_BN.bias.copy_(torch.tensor([-0.2, 0.3, 1.0]))


def seeded_mgd_keywords() -> dict:
    """MGD's fixed align module and a freshly seeded mask generator (calls compare equal)."""
    return {"align": MGD_ALIGN, "generator": torch.Generator().manual_seed(0)}


def labels_for(logits) -> torch.Tensor:
    """Valid class indices for a batch of logits (all class 1)."""
    return torch.ones(len(logits), dtype=torch.long)


def network_outputs() -> list[torch.Tensor]:
    """Student and teacher logits computed from inputs that require grad, and the inputs."""
    x = randn(2, 4, seed=20, requires_grad=True)
    return [STUDENT_NET(x), TEACHER_NET(x), x]


def fragments(*parts: str) -> str:
    """A regex matching the literal ``parts`` in this order, anything between them."""
    return ".*".join(map(re.escape, parts))


@dataclass
class Case:
    id: str
    function: Callable
    make: Callable[[], list[torch.Tensor]]  # fresh valid inputs
    names: tuple[str, ...]  # what the error messages call each input
    ranks: tuple[str, ...]  # how the rank error describes each input
    arguments: Callable = lambda *tensors: tensors  # the loss's positional arguments
    batched: tuple[tuple[int, int], ...] = ((0, 1),)  # inputs compared for batch and device
    # Regex for input ``mismatch_index`` given one more channel/class; None: channels may differ.
    mismatch: str | None = None
    mismatch_index: int = 1
    spatial: tuple[tuple[int, int], ...] = ()  # inputs matched by average pooling (pool=)
    relayout: tuple[int, ...] | None = None  # inputs whose layout may change (None: all)
    bad_options: tuple = ()  # (kwargs, error, match) rejected by function and module
    # Numeric options with a valid whole value (with the options they need to matter): any
    # real number type holding it must give the loss of the float.
    numbers: tuple[tuple[str, int, dict], ...] = ()
    module: type | None = None
    module_options: dict = field(default_factory=dict)
    module_arguments: tuple = ()  # the module's positional constructor arguments
    # The module's forward arguments (None: the function's positional arguments).
    module_inputs: Callable | None = None
    core: str | None = None  # registry core behind backend=; None: no backend argument
    reference_only: bool = False  # the core has no native or Triton implementation
    keywords: Callable[[], dict] = dict  # fresh keyword arguments that every call passes

    def __call__(self, tensors, **options):
        return self.function(*self.arguments(*tensors), **self.keywords(), **options)

    def build_module(self, **options) -> nn.Module:
        return self.module(*self.module_arguments, **options)

    def call_module(self, module: nn.Module, tensors):
        return module(*(self.module_inputs or self.arguments)(*tensors))


def non_finite(name: str) -> tuple:
    """NaN and the infinities: rejected for every numeric option."""
    return tuple(({name: value}, ValueError, f"{name} must be a finite number")
                 for value in (float("nan"), float("inf"), float("-inf")))


def positive(name: str) -> tuple:
    """The bad values of an option that must be a number > 0."""
    return (({name: 0.0}, ValueError, f"{name} must be > 0"),
            ({name: -1.0}, ValueError, f"{name} must be > 0"),
            *non_finite(name),
            ({name: "1"}, TypeError, f"{name} must be a number"),
            ({name: True}, TypeError, f"{name} must be a number"))


def non_negative(name: str) -> tuple:
    """The bad values of an option that must be a number >= 0."""
    return (({name: -1.0}, ValueError, f"{name} must be >= 0"),
            *non_finite(name),
            ({name: "1"}, TypeError, f"{name} must be a number"),
            ({name: True}, TypeError, f"{name} must be a number"))


def flag(name: str) -> tuple:
    """The bad value of an option that must be True or False."""
    return (({name: "yes"}, TypeError, f"{name} must be True or False"),)


def two(shape_s, shape_t, seed=0):
    """``make`` for a loss of two tensors: fresh float64 inputs of these shapes."""
    return lambda: [randn(*shape_s, seed=seed), randn(*shape_t, seed=seed + 1)]


LOGIT_PAIR = ("student_logits", "teacher_logits")
OFD_MARGIN = ofd_margin(OFD_BN)  # one per channel, what OFDLoss(OFD_BN) keeps
LLM_HIDDEN = "2-D or 3-D (N, H) or (B, T, H)"
LM_HEAD = "2-D (vocab_size, hidden_size)"
VID_RANK = "2-D or 3-D or 4-D or 5-D (B, C, ...)"
VID_VARIANCE = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)

CASES = [
    Case("at", at_loss, two((2, 3, 4, 6), (2, 5, 4, 6)), ("student", "teacher"),
         (FEATURES, FEATURES), spatial=((0, 1),),
         bad_options=(({"p": 0.5}, ValueError, "p must be >= 1"), *non_finite("p"),
                      ({"mode": "fancy"}, ValueError, "mode must be one of"), *flag("pool")),
         numbers=(("p", 3, {}),),
         module=kdfast.ATLoss, module_options={"p": 3.0, "mode": "paper"},
         core="attention_map"),
    Case("nst", nst_loss, two((2, 3, 4, 6), (2, 5, 4, 6)), ("student", "teacher"),
         (FEATURES, FEATURES), spatial=((0, 1),),
         bad_options=(
             ({"kernel": "gauss"}, ValueError, "kernel must be one of"),
             ({"degree": 0}, ValueError, "degree must be an int >= 1"),
             ({"degree": 2.0}, TypeError, "degree must be an int"),
             ({"degree": True}, TypeError, "degree must be an int"),
             *non_negative("coef"),
             ({"sigma2": 0.0}, ValueError, "sigma2 must be > 0"),
             ({"sigma2": -1}, ValueError, "sigma2 must be > 0"),
             ({"sigma2": []}, ValueError, "sigma2 must not be an empty list"),
             ({"sigma2": [1.0, -2.0]}, ValueError, r"sigma2\[1\] must be > 0"),
             ({"sigma2": [1.0, "a"]}, TypeError, r"sigma2\[1\] must be a number"),
             ({"sigma2": "median"}, ValueError, "sigma2 must be one of 'mean'"),
             ({"sigma2": None}, TypeError, "sigma2 must be a positive float"),
             *non_finite("sigma2"),
             ({"sigma2": [1.0, float("inf")]}, ValueError, r"sigma2\[1\] must be a finite"),
             ({"teacher_term": 1}, TypeError, "teacher_term must be True or False"),
             *flag("unbiased"), *flag("pool")),
         numbers=(("coef", 1, {}), ("sigma2", 2, {"kernel": "rbf"})),
         module=kdfast.NSTLoss,
         module_options={"kernel": "rbf", "sigma2": [1.0, 4.0], "unbiased": True,
                         "reduction": "sum"},
         core="channel_mmd"),
    Case("ab", ab_loss, two((2, 3, 4, 6), (2, 3, 4, 6)), ("student_preact", "teacher_preact"),
         (FEATURES, FEATURES), spatial=((0, 1),),
         mismatch=fragments("student_preact has 3 channels but teacher_preact has 4",
                            "pass connector="),
         bad_options=(*positive("margin"), *flag("pool")),
         numbers=(("margin", 2, {}),),
         module=kdfast.ABLoss, module_options={"margin": 2.0, "reduction": "sum"},
         core="ab", reference_only=True),
    Case("sp", sp_loss, two((3, 3, 4, 6), (3, 5, 2, 3)), ("student", "teacher"),
         (ANY_RANK, ANY_RANK),
         bad_options=flag("gather"),
         module=kdfast.SPLoss, module_options={"reduction": "sum"}, core="similarity"),
    Case("rkd", rkd_loss, two((4, 3, 2, 3), (4, 7)), ("student", "teacher"),
         (EMBEDDINGS, EMBEDDINGS),
         bad_options=(
             *non_negative("distance_weight"), *non_negative("angle_weight"),
             ({"distance_weight": 0.0, "angle_weight": 0}, ValueError, "both 0"),
             ({"gather": 1}, TypeError, "gather must be True or False")),
         numbers=(("distance_weight", 2, {}), ("angle_weight", 3, {})),
         module=kdfast.RKDLoss, module_options={"distance_weight": 1.0, "angle_weight": 2.0},
         core="rkd", reference_only=True),
    Case("fitnet", fitnet_loss, two((2, 3, 4, 6), (2, 3, 4, 6)), ("student", "teacher"),
         (ANY_RANK, ANY_RANK),
         mismatch=fragments("student and teacher must have the same shape, got (2, 3, 4, 6) "
                            "and (2, 4, 4, 6)", "pass connector="),
         module=kdfast.FitNetLoss, module_options={"reduction": "none"},
         core="fitnet", reference_only=True),
    Case("fsp", fsp_loss,
         lambda: [randn(2, 3, 4, 6, seed=0), randn(2, 5, 4, 6, seed=1),
                  randn(2, 3, 4, 6, seed=2), randn(2, 5, 4, 6, seed=3)],
         ("student_pairs[0][0]", "student_pairs[0][1]", "teacher_pairs[0][0]",
          "teacher_pairs[0][1]"), (FEATURES,) * 4,
         arguments=lambda sa, sb, ta, tb: ([(sa, sb)], [(ta, tb)]),
         batched=((0, 1), (0, 2), (2, 3)), spatial=((0, 1), (2, 3)),
         mismatch=fragments("pair 0: student_pairs[0] has channels (C_a, C_b) = (3, 5) but "
                            "teacher_pairs[0] has (3, 6)", "1x1 conv"),
         mismatch_index=3,
         bad_options=flag("pool"),
         module=kdfast.FSPLoss, module_options={"reduction": "none"}, core="fsp"),
    Case("kd", kd_loss, two((3, 5), (3, 5)), LOGIT_PAIR, (LOGITS, LOGITS),
         mismatch=fragments("student_logits and teacher_logits must have the same shape, got "
                            "(3, 5) and (3, 6)", "both must score the same classes"),
         bad_options=(*positive("temperature"),
                      ({"reduction": "batchmean"}, ValueError, "reduction must be one of")),
         numbers=(("temperature", 2, {}),),
         module=kdfast.KDLoss, module_options={"temperature": 2.0, "reduction": "sum"},
         core="softmax_kl"),
    Case("dml", dml_loss, two((3, 5), (3, 5)), ("logits", "peer_logits[0]"), (LOGITS, LOGITS),
         arguments=lambda z, peer: (z, [peer]),
         mismatch=fragments("logits and peer_logits[0] must have the same shape"),
         bad_options=positive("temperature"),
         numbers=(("temperature", 2, {}),),
         module=kdfast.DMLLoss, module_options={"temperature": 3.0, "reduction": "none"},
         core="softmax_kl"),
    Case("ban", ban_generation_loss, two((3, 5), (3, 5)), ("student_logits", "previous_logits"),
         (LOGITS, LOGITS),
         mismatch=fragments("student_logits and previous_logits must have the same shape"),
         bad_options=(*positive("temperature"), *non_negative("label_weight")),
         numbers=(("temperature", 2, {}), ("label_weight", 0, {})),
         core="softmax_kl"),
    Case("discriminator", discriminator_loss, two((3, 4), (3, 4)), LOGIT_PAIR, (LOGITS, LOGITS),
         arguments=lambda s, t: (DISCRIMINATOR, s, t, labels_for(s)),
         mismatch=fragments("student_logits and teacher_logits must have the same shape"),
         bad_options=(({"kind": "wgan"}, ValueError, "kind must be one of"),)),
    Case("adversarial_student", adversarial_student_loss, two((3, 4), (3, 4)), LOGIT_PAIR,
         (LOGITS, LOGITS),
         arguments=lambda s, t: (DISCRIMINATOR, s, t, labels_for(s)),
         mismatch=fragments("student_logits and teacher_logits must have the same shape"),
         bad_options=(({"kind": "wgan"}, ValueError, "kind must be one of"),
                      *non_negative("l1_weight")),
         numbers=(("l1_weight", 2, {}),)),
    Case("gradient_at", gradient_at_loss, network_outputs, (*LOGIT_PAIR, "inputs"),
         (LOGITS, LOGITS, ANY_RANK),
         arguments=lambda s, t, x: (s, t, x, labels_for(s)),
         batched=((0, 1), (0, 2)),
         mismatch=fragments("student_logits and teacher_logits must have the same shape"),
         relayout=(0, 1),  # the logits must be computed from the inputs as given
         module=kdfast.GradientATLoss, module_options={"reduction": "none"},
         core="gradient_at", reference_only=True),
    Case("ofd", ofd_loss, two((2, 3, 4, 6), (2, 3, 4, 6)), ("student", "teacher"),
         (FEATURES, FEATURES),
         arguments=lambda s, t: (s, t, OFD_MARGIN),
         mismatch=fragments("student and teacher must have the same shape, got (2, 3, 4, 6) "
                            "and (2, 4, 4, 6)", "connector"),
         module=kdfast.OFDLoss, module_arguments=(OFD_BN,), module_inputs=lambda s, t: (s, t),
         module_options={"reduction": "sum"},
         core="ofd", reference_only=True),
    Case("hcl", hcl_loss,
         lambda: [randn(2, 3, 8, 8, seed=0), randn(2, 4, 4, 4, seed=1),
                  randn(2, 3, 8, 8, seed=2), randn(2, 4, 4, 4, seed=3)],
         ("student_feats[0]", "student_feats[1]", "teacher_feats[0]", "teacher_feats[1]"),
         (FEATURES,) * 4,
         arguments=lambda s0, s1, t0, t1: ([s0, s1], [t0, t1]),
         batched=((0, 1), (0, 2), (1, 3)),
         mismatch=fragments("student_feats[1] and teacher_feats[1] must have the same shape",
                            "kdfast.ReviewKD"),
         bad_options=(({"levels": (4, 0)}, ValueError, r"levels\[1\] must be an int >= 1"),
                      ({"levels": 4}, TypeError, "levels must be a tuple"),
                      ({"levels": (2.0,)}, TypeError, r"levels\[0\] must be an int")),
         module=kdfast.ReviewKDLoss, module_options={"levels": (2, 1), "reduction": "sum"},
         core="hcl", reference_only=True),
    # CRDLoss embeds raw features with its heads and draws the bank rows from its own state,
    # so it is not this function on the same tensors: its module-form checks (options as
    # attributes, bad values, state in buffers) are in tests/losses/test_crd.py.
    Case("crd", crd_loss,
         lambda: [randn(2, 3, seed=0), randn(2, 3, seed=1), randn(2, 4, 3, seed=2),
                  randn(2, 4, 3, seed=3)],
         ("student", "teacher", "student_bank", "teacher_bank"),
         ("2-D (B, feat_dim)",) * 2 + ("3-D (B, K + 1, feat_dim)",) * 2,
         arguments=lambda s, t, s_bank, t_bank: (s, t, s_bank, t_bank, 10),
         batched=((0, 1), (0, 2), (0, 3)),
         mismatch=fragments("student and teacher must have the same shape", "feat_dim"),
         bad_options=(*positive("temperature"),
                      ({"normalizers": (1.0,)}, TypeError,
                       "normalizers must be None .* or a pair"),
                      ({"normalizers": (1.0, 0.0)}, ValueError, r"normalizers\[1\] must be > 0")),
         numbers=(("temperature", 2, {}),),
         core="crd", reference_only=True),
    Case("pkt", pkt_loss, two((3, 3, 4, 6), (3, 5, 2, 3)), ("student", "teacher"),
         (EMBEDDINGS, EMBEDDINGS),
         bad_options=positive("eps"), numbers=(("eps", 1, {}),),
         module=kdfast.PKTLoss, module_options={"eps": 1e-6, "reduction": "sum"},
         core="pkt", reference_only=True),
    Case("cc", cc_loss, two((3, 4), (3, 6)), ("student", "teacher"), (EMBEDDINGS, EMBEDDINGS),
         bad_options=(
             ({"variant": "crd"}, ValueError, "variant must be one of"),
             ({"kernel": "rbf"}, ValueError, "kernel must be one of"),
             *positive("gamma"),
             ({"order": 0}, ValueError, "order must be an int >= 1"),
             ({"order": 2.0}, TypeError, "order must be an int >= 1"),
             *flag("squared")),
         numbers=(("gamma", 1, {}),),
         module=kdfast.CCLoss,
         module_options={"kernel": "bilinear", "squared": True, "reduction": "sum"},
         core="cc", reference_only=True),
    Case("vid", vid_loss, two((2, 3, 4, 6), (2, 3, 4, 6)), ("predicted_mean", "teacher"),
         (VID_RANK, VID_RANK), arguments=lambda mean, t: (mean, t, VID_VARIANCE),
         mismatch=fragments("predicted_mean and teacher must have the same shape",
                            "the regressor must map"),
         core="vid", reference_only=True),
    Case("ft", ft_loss, two((2, 3, 4, 6), (2, 5, 4, 6)), ("student_factor", "teacher_factor"),
         (FEATURES, FEATURES), spatial=((0, 1),),
         bad_options=(({"mode": "torchdistill"}, ValueError, "mode must be one of"),
                      *positive("power"), *flag("pool")),
         numbers=(("power", 1, {}),),
         module=kdfast.FTLoss, module_options={"power": 1.0, "reduction": "sum"},
         core="ft", reference_only=True),
    Case("kdsvd", kdsvd_loss,
         lambda: [randn(2, 3, 4, 4, seed=0), randn(2, 4, 2, 2, seed=1),
                  randn(2, 3, 4, 4, seed=2), randn(2, 4, 2, 2, seed=3)],
         ("student_features[0]", "student_features[1]", "teacher_features[0]",
          "teacher_features[1]"), (FEATURES,) * 4,
         arguments=lambda s0, s1, t0, t1: ([s0, s1], [t0, t1]),
         batched=((0, 1), (0, 2), (1, 3)),
         mismatch=fragments("student_features[1] has 5 channels but teacher_features[1] has 4",
                            "1x1 conv"),
         bad_options=(({"k": 0}, ValueError, "k must be an int >= 1"),
                      ({"k": 1.0}, TypeError, "k must be an int >= 1")),
         module=kdfast.KDSVDLoss, module_options={"k": 2, "reduction": "sum"},
         core="kdsvd", reference_only=True),
    Case("srd", srd_loss,
         lambda: [randn(3, 4, seed=0), randn(3, 4, seed=1), randn(3, 5, seed=2),
                  randn(3, 5, seed=3)],
         ("student", "teacher", *LOGIT_PAIR), (EMBEDDINGS, EMBEDDINGS, LOGITS, LOGITS),
         batched=((0, 1), (0, 2), (2, 3)),
         mismatch=fragments("student and teacher must have the same shape", "projector"),
         bad_options=(*positive("exponent"), *positive("temperature")),
         numbers=(("exponent", 2, {}), ("temperature", 2, {})),
         module=kdfast.SRDLoss,
         module_options={"exponent": 2.0, "temperature": 3.0, "reduction": "sum"},
         core="softmax_kl"),
    Case("dkd", dkd_loss, two((3, 5), (3, 5)), LOGIT_PAIR, (LOGITS, LOGITS),
         arguments=lambda s, t: (s, t, labels_for(s)),
         mismatch=fragments("student_logits and teacher_logits must have the same shape"),
         bad_options=(*positive("temperature"), *non_negative("alpha"), *non_negative("beta"),
                      *non_negative("warmup_factor")),
         numbers=(("temperature", 2, {}), ("alpha", 2, {}), ("beta", 3, {}),
                  ("warmup_factor", 0, {})),
         module=kdfast.DKDLoss,
         module_options={"temperature": 2.0, "alpha": 0.5, "beta": 2.0, "warmup_factor": 0.5,
                         "reduction": "sum"},
         core="softmax_kl"),
    Case("lskd", lskd_loss, two((3, 5), (3, 5)), LOGIT_PAIR, (LOGITS, LOGITS),
         mismatch=fragments("student_logits and teacher_logits must have the same shape"),
         bad_options=(*positive("temperature"), *positive("eps")),
         numbers=(("temperature", 3, {}), ("eps", 1, {})),
         module=kdfast.LSKDLoss, module_options={"temperature": 4.0, "reduction": "none"},
         core="softmax_kl"),
    Case("dist", dist_loss, two((3, 5), (3, 5)), LOGIT_PAIR, (LOGITS, LOGITS),
         mismatch=fragments("student_logits and teacher_logits must have the same shape"),
         bad_options=(*positive("temperature"), *non_negative("beta"), *non_negative("gamma"),
                      *positive("eps")),
         numbers=(("temperature", 2, {}), ("beta", 2, {}), ("gamma", 0, {})),
         module=kdfast.DISTLoss,
         module_options={"temperature": 4.0, "beta": 2.0, "gamma": 0.5, "reduction": "sum"},
         core="dist", reference_only=True),
    Case("wsld", wsld_loss, two((3, 5), (3, 5)), LOGIT_PAIR, (LOGITS, LOGITS),
         arguments=lambda s, t: (s, t, labels_for(s)),
         mismatch=fragments("student_logits and teacher_logits must have the same shape"),
         bad_options=positive("temperature"),
         numbers=(("temperature", 2, {}),),
         module=kdfast.WSLDLoss, module_options={"temperature": 2.0, "reduction": "none"},
         core="softmax_kl"),
    Case("cwd", cwd_loss, two((2, 3, 4, 6), (2, 3, 4, 6)), ("student", "teacher"),
         (FEATURES, FEATURES),
         mismatch=fragments("student and teacher must have the same shape, got (2, 3, 4, 6) "
                            "and (2, 4, 4, 6)", "1x1 conv"),
         bad_options=(*positive("temperature"), *non_negative("loss_weight")),
         numbers=(("temperature", 2, {}), ("loss_weight", 3, {})),
         module=kdfast.CWDLoss, module_options={"temperature": 4.0, "loss_weight": 3.0,
                                                "reduction": "sum"},
         core="softmax_kl"),
    Case("pkd", pkd_loss, two((2, 3, 4, 6), (2, 3, 4, 6)), ("student", "teacher"),
         (FEATURES, FEATURES),
         mismatch=fragments("student has 3 channels but teacher has 4", "1x1 conv"),
         bad_options=(*non_negative("loss_weight"), *flag("resize_student")),
         numbers=(("loss_weight", 2, {}),),
         module=kdfast.PKDLoss, module_options={"loss_weight": 2.0, "resize_student": False,
                                                "reduction": "none"},
         core="pkd", reference_only=True),
    # The module's forward takes the teacher and label tensors by keyword (not options), so
    # the module-form checks of this table do not fit it: tests/losses/test_fused_linear_kd.py.
    Case("fused_linear_kd", fused_linear_kd_loss,
         lambda: [randn(5, 4, seed=0), randn(7, 4, seed=1), randn(5, 3, seed=2),
                  randn(7, 3, seed=3)],
         ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight"),
         (LLM_HIDDEN, LM_HEAD, LLM_HIDDEN, LM_HEAD), batched=((0, 2),),
         mismatch=fragments("student_weight has hidden size 5 but student_hidden has 4",
                            "pass the lm_head weight"),
         bad_options=(({"divergence": "kl"}, ValueError, "divergence must be one of"),
                      ({"beta": 1.5}, ValueError, r"beta must be in \[0, 1\]"),
                      *positive("temperature"), *non_negative("soft_weight"),
                      *non_negative("hard_weight"),
                      ({"chunk_size": 0}, ValueError, "chunk_size must be an int >= 1")),
         numbers=(("temperature", 2, {}), ("soft_weight", 3, {})),
         core="fused_linear_kd"),
    Case("mgd", mgd_loss, two((2, 3, 4, 6), (2, 5, 4, 6)), ("student", "teacher"),
         (FEATURES, FEATURES), arguments=lambda s, t: (s, t, MGD_GENERATION),
         keywords=seeded_mgd_keywords,
         mismatch=fragments("align(student) and teacher must have the same shape, got "
                            "(2, 5, 4, 6) and (2, 6, 4, 6)", "pass align="),
         bad_options=(*non_negative("alpha_mgd"), *non_negative("lambda_mgd"),
                      ({"lambda_mgd": 1.5}, ValueError, "lambda_mgd must be <= 1")),
         numbers=(("alpha_mgd", 2, {}), ("lambda_mgd", 1, {})),
         core="mgd", reference_only=True),
]


def by_case(cases=CASES):
    return pytest.mark.parametrize("case", cases, ids=[case.id for case in cases])


def each_input(select=lambda case, k: True):
    return pytest.mark.parametrize("case,k", [
        pytest.param(case, k, id=f"{case.id}-{case.names[k]}")
        for case in CASES for k in range(len(case.names)) if select(case, k)])


def each_pair(attribute: str):
    return pytest.mark.parametrize("case,pair", [
        pytest.param(case, pair, id=f"{case.id}-{case.names[pair[0]]}-{case.names[pair[1]]}")
        for case in CASES for pair in getattr(case, attribute)])


def replaced(tensors: list[torch.Tensor], k: int, new) -> list:
    return tensors[:k] + [new] + tensors[k + 1:]


def raises_with(case: Case, tensors, error, match, **options) -> None:
    with pytest.raises(error, match=match):
        case(tensors, **options)


# --- bad inputs: one input broken at a time --------------------------------------------------

@each_input()
def test_rejects_a_non_tensor(case, k):
    tensors = case.make()
    raises_with(case, replaced(tensors, k, tensors[k].detach().numpy()), TypeError,
                fragments(f"{case.names[k]} must be a torch.Tensor"))


@each_input()
def test_rejects_an_integer_dtype(case, k):
    tensors = case.make()
    name = case.names[k]
    raises_with(case, replaced(tensors, k, tensors[k].detach().to(torch.int64)), TypeError,
                fragments(f"{name} must be a floating-point tensor", f"{name}.float()"))


@each_input()
def test_rejects_a_wrong_rank(case, k):
    tensors = case.make()
    raises_with(case, replaced(tensors, k, tensors[k].reshape(-1)), ValueError,
                fragments(f"{case.names[k]} must be {case.ranks[k]}, got shape"))


@each_input()
def test_rejects_an_empty_tensor(case, k):
    tensors = case.make()
    raises_with(case, replaced(tensors, k, tensors[k].narrow(1, 0, 0)), ValueError,
                fragments(f"{case.names[k]} is empty", "every dimension must be at least 1"))


@each_pair("batched")
def test_rejects_a_batch_mismatch(case, pair):
    i, j = pair
    tensors = case.make()
    longer = torch.cat([tensors[j], tensors[j][:1]])
    raises_with(case, replaced(tensors, j, longer), ValueError,
                fragments(f"{case.names[i]} and {case.names[j]} must have the same batch size"))


@each_pair("batched")
def test_rejects_a_device_mismatch(case, pair):
    i, j = pair
    tensors = case.make()
    raises_with(case, replaced(tensors, j, tensors[j].detach().to("meta")), ValueError,
                fragments(f"{case.names[i]} is on cpu but {case.names[j]} is on meta",
                          "move both to one device"))


@by_case()
def test_channel_mismatch_raises_or_is_allowed(case):
    tensors = case.make()
    k = case.mismatch_index
    wider = replaced(tensors, k, torch.cat([tensors[k], tensors[k].narrow(1, 0, 1)], dim=1))
    if case.mismatch is None:  # channels / feature sizes may differ for this loss
        assert torch.isfinite(case(wider)).all()
    else:
        raises_with(case, wider, ValueError, case.mismatch)


# The second map of a pooled pair cut to (H, W), the options, and the message (a, b: names).
SPATIAL_FAULTS = {
    "pool_false": ((2, 3), {"pool": False},
                   ("{a} spatial size (4, 6) differs from {b}'s (2, 3) and pool=False; "
                    "pass pool=True",)),
    "unpoolable": ((3, 5), {},
                   ("{a} spatial size (4, 6) and {b}'s (3, 5) cannot be matched by average "
                    "pooling", "resize one of them")),
}


@each_pair("spatial")
@pytest.mark.parametrize("fault", sorted(SPATIAL_FAULTS))
def test_rejects_spatial_sizes_it_cannot_match(case, pair, fault):
    (i, j), ((h, w), options, message) = pair, SPATIAL_FAULTS[fault]
    tensors = case.make()
    names = {"a": case.names[i], "b": case.names[j]}
    raises_with(case, replaced(tensors, j, tensors[j][..., :h, :w]), ValueError,
                fragments(*(part.format(**names) for part in message)), **options)


# --- values: layouts and reductions ----------------------------------------------------------

def non_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-1, -2).contiguous().transpose(-1, -2)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


LAYOUTS = [
    pytest.param(case, k, layout, id=f"{case.id}-{case.names[k]}-{layout.__name__}")
    for case in CASES for k, x in enumerate(case.make())
    if case.relayout is None or k in case.relayout
    for layout in ((non_contiguous, channels_last) if x.dim() == 4 else (non_contiguous,))]


@pytest.mark.parametrize("case,k,layout", LAYOUTS)
def test_layouts_give_the_same_loss(case, k, layout):
    tensors = case.make()
    moved = layout(tensors[k])
    assert not moved.is_contiguous()
    torch.testing.assert_close(case(replaced(tensors, k, moved)), case(tensors))


@by_case()
def test_reductions_are_the_mean_and_sum_of_the_per_sample_losses(case):
    tensors = case.make()
    per_sample = case(tensors, reduction="none")
    assert per_sample.shape == (len(tensors[0]),) and torch.isfinite(per_sample).all()
    for reduction in REDUCTIONS:
        torch.testing.assert_close(case(tensors, reduction=reduction),
                                   reduced(per_sample, reduction))
    torch.testing.assert_close(case(tensors), per_sample.mean())  # "mean" is the default


# --- options and the module form -------------------------------------------------------------

BAD_REDUCTION = ({"reduction": "avg"}, ValueError, "reduction must be one of")


@pytest.mark.parametrize("case,kwargs,error,match", [
    pytest.param(case, kwargs, error, match,
                 id=f"{case.id}-{'-'.join(f'{k}={v!r}' for k, v in kwargs.items())}")
    for case in CASES for kwargs, error, match in (*case.bad_options, BAD_REDUCTION)])
def test_bad_options_raise_in_the_function_and_the_module(case, kwargs, error, match):
    raises_with(case, case.make(), error, match, **kwargs)
    if case.module is not None:
        with pytest.raises(error, match=match):
            case.build_module(**kwargs)


@by_case([case for case in CASES if case.module is not None])
def test_module_matches_function_and_shows_its_options(case):
    tensors = case.make()
    module = case.build_module(**case.module_options)
    torch.testing.assert_close(case.call_module(module, tensors),
                               case(tensors, **case.module_options))
    for key, value in case.module_options.items():
        assert f"{key}={value!r}" in repr(module)


@by_case([case for case in CASES if case.module is not None])
def test_module_options_are_attributes_that_take_effect(case):
    tensors = case.make()
    module = case.build_module()
    for key, value in case.module_options.items():
        setattr(module, key, value)
        assert getattr(module, key) == value
    torch.testing.assert_close(case.call_module(module, tensors),
                               case(tensors, **case.module_options))


WITH_MODULE = [case for case in CASES if case.module is not None]


@pytest.mark.parametrize("case,kwargs,error,match", [
    pytest.param(case, kwargs, error, match,
                 id=f"{case.id}-{'-'.join(f'{k}={v!r}' for k, v in kwargs.items())}")
    for case in WITH_MODULE for kwargs, error, match in (*case.bad_options, BAD_REDUCTION)])
def test_module_rejects_a_bad_assignment_and_keeps_the_old_value(case, kwargs, error, match):
    tensors = case.make()
    module = case.build_module()
    with pytest.raises(error, match=match):
        for key, value in kwargs.items():  # options that constrain each other: the last fails
            failing, old = key, getattr(module, key)
            setattr(module, key, value)
    assert getattr(module, failing) == old
    torch.testing.assert_close(case.call_module(module, tensors),
                               case(tensors, **dict(module.options)))


@by_case(WITH_MODULE)
def test_every_option_of_the_function_is_a_module_attribute(case):
    module = case.build_module()
    defaults = {name: parameter.default
                for name, parameter in inspect.signature(case.function).parameters.items()
                if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name != "connector"}
    assert dict(module.options) == {name: getattr(module, name) for name in defaults}
    assert dict(module.options) == defaults
    with pytest.raises(TypeError):
        module.options["reduction"] = "sum"  # read-only: assign the attribute instead


@by_case(WITH_MODULE)
def test_module_options_survive_copy_and_pickle_and_stay_out_of_the_state_dict(case):
    module = case.build_module(**case.module_options)
    tensors = case.make()
    expected = case.call_module(module, tensors)
    for clone in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        assert dict(clone.options) == dict(module.options)
        torch.testing.assert_close(case.call_module(clone, tensors), expected)
        with pytest.raises(ValueError, match="reduction must be one of"):
            clone.reduction = "avg"
    assert not any(name in module.state_dict() for name in module.options)


@by_case([case for case in CASES if case.module is not None and case.core is not None])
def test_module_rejects_an_unknown_backend_at_construction(case):
    with pytest.raises(ValueError, match="backend must be one of"):
        case.build_module(backend="bogus")


NUMBER_TYPES = (int, float, np.float32, np.float64, np.int64, fractions.Fraction)


@pytest.mark.parametrize("case,name,value,context", [
    pytest.param(case, name, value, context, id=f"{case.id}-{name}")
    for case in CASES for name, value, context in case.numbers])
def test_any_real_number_type_is_accepted_for_a_numeric_option(case, name, value, context):
    tensors = case.make()
    expected = case(tensors, **context, **{name: float(value)})
    for number_type in NUMBER_TYPES:
        option = {name: number_type(value)}
        torch.testing.assert_close(case(tensors, **context, **option), expected,
                                   msg=number_type.__name__)
        if case.module is not None:
            module = case.build_module(**context, **option)
            torch.testing.assert_close(case.call_module(module, tensors), expected)
            setattr(module, name, number_type(value))
            assert getattr(module, name) == value


def test_numpy_numbers_in_an_nst_bandwidth_list_and_degree():
    s, t = randn(2, 3, 4, 6, seed=0), randn(2, 5, 4, 6, seed=1)
    torch.testing.assert_close(
        nst_loss(s, t, kernel="rbf", sigma2=[np.float32(0.5), np.float64(2.0)]),
        nst_loss(s, t, kernel="rbf", sigma2=[0.5, 2.0]))
    torch.testing.assert_close(nst_loss(s, t, degree=np.int64(3)), nst_loss(s, t, degree=3))
    with pytest.raises(TypeError, match="degree must be an int"):
        nst_loss(s, t, degree=np.float64(3.0))


@by_case()
def test_exported_from_kdfast_functional(case):
    assert getattr(kdfast.functional, case.function.__name__) is case.function


# --- backend policy --------------------------------------------------------------------------

WITH_BACKEND = [case for case in CASES if case.core is not None]
REFERENCE_ONLY = [pytest.param(case, backend, id=f"{case.id}-{backend}")
                  for case in CASES if case.reference_only for backend in FUSED_BACKENDS]


@by_case(WITH_BACKEND)
def test_unknown_backend_raises(case):
    raises_with(case, case.make(), ValueError, "backend must be one of", backend="gpu")


@by_case(WITH_BACKEND)
def test_auto_agrees_with_reference(case):
    tensors = case.make()
    assert_rel_close(case(tensors, backend="auto"), case(tensors, backend="reference"), 1e-12)


@pytest.mark.parametrize("case,backend", REFERENCE_ONLY)
def test_fused_backend_asked_for_by_argument_raises(case, backend):
    raises_with(case, case.make(), ValueError,
                fragments(f"backend='{backend}' cannot run {case.core}", "backend='auto'"),
                backend=backend)


@pytest.mark.parametrize("case,backend", REFERENCE_ONLY)
def test_fused_backend_asked_for_by_environment_falls_back(case, backend, monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, backend)
    monkeypatch.setattr(backends, "_WARNED", set())
    tensors = case.make()
    with pytest.warns(RuntimeWarning, match=f"cannot run {case.core}.*falling back"):
        out = case(tensors)
    torch.testing.assert_close(out, case(tensors, backend="reference"))
