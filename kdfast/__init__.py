"""kdfast: knowledge-distillation losses with fused kernels behind a pure-PyTorch reference.

    import kdfast
    loss = kdfast.NSTLoss(kernel="poly")(student_features, teacher_features)
"""

from kdfast import functional, recipes
from kdfast.backends import available_backends
from kdfast.distill import Distiller, Term
from kdfast.losses.ab import ABLoss
from kdfast.losses.adversarial import ConditionalDiscriminator
from kdfast.losses.attention import ATLoss
from kdfast.losses.cc import CCLoss
from kdfast.losses.crd import CRDLoss, EmbeddingHead
from kdfast.losses.cwd import CWDLoss
from kdfast.losses.dist import DISTLoss
from kdfast.losses.dkd import DKDLoss
from kdfast.losses.dml import DMLLoss
from kdfast.losses.fitnet import FitNetLoss, make_connector
from kdfast.losses.fsp import FSPLoss
from kdfast.losses.ft import FTLoss, Paraphraser, Translator
from kdfast.losses.fused_linear_kd import FusedLinearKDLoss
from kdfast.losses.gradient_attention import GradientATLoss
from kdfast.losses.kd import KDLoss
from kdfast.losses.kdsvd import KDSVDLoss
from kdfast.losses.lskd import LSKDLoss
from kdfast.losses.mgd import MGDLoss, make_generation_block
from kdfast.losses.nst import NSTLoss
from kdfast.losses.ofd import OFDLoss, make_ofd_connector
from kdfast.losses.pkd import PKDLoss
from kdfast.losses.pkt import PKTLoss
from kdfast.losses.reviewkd import AttentionBasedFusion, ReviewKD, ReviewKDLoss
from kdfast.losses.rkd import RKDLoss
from kdfast.losses.sp import SPLoss
from kdfast.losses.srd import SRDLoss
from kdfast.losses.vid import VIDLoss
from kdfast.losses.wsld import WSLDLoss
from kdfast.recipes import AdversarialKD, BornAgain, BornAgainEnsemble, MutualLearning

__version__ = "0.1.0"

__all__ = [
    "ABLoss", "ATLoss", "AdversarialKD", "AttentionBasedFusion", "BornAgain", "BornAgainEnsemble",
    "CCLoss", "CRDLoss", "CWDLoss", "ConditionalDiscriminator", "DISTLoss", "DKDLoss", "DMLLoss",
    "Distiller", "EmbeddingHead", "FSPLoss", "FTLoss", "FitNetLoss", "FusedLinearKDLoss",
    "GradientATLoss", "KDLoss", "KDSVDLoss", "LSKDLoss", "MGDLoss", "MutualLearning", "NSTLoss",
    "OFDLoss", "PKDLoss", "PKTLoss", "Paraphraser", "RKDLoss", "ReviewKD", "ReviewKDLoss", "SPLoss",
    "SRDLoss", "Term", "Translator", "VIDLoss", "WSLDLoss", "available_backends", "functional",
    "make_connector", "make_generation_block", "make_ofd_connector", "recipes",
]
