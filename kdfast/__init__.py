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
from kdfast.losses.dml import DMLLoss
from kdfast.losses.fitnet import FitNetLoss, make_connector
from kdfast.losses.fsp import FSPLoss
from kdfast.losses.gradient_attention import GradientATLoss
from kdfast.losses.kd import KDLoss
from kdfast.losses.nst import NSTLoss
from kdfast.losses.rkd import RKDLoss
from kdfast.losses.sp import SPLoss
from kdfast.recipes import AdversarialKD, BornAgain, BornAgainEnsemble, MutualLearning

# isort: split
# zoo-dense losses
from kdfast.losses.cwd import CWDLoss
from kdfast.losses.mgd import MGDLoss, make_generation_block
from kdfast.losses.pkd import PKDLoss

__version__ = "0.1.0"

__all__ = [
    "ABLoss", "ATLoss", "AdversarialKD", "BornAgain", "BornAgainEnsemble",
    "ConditionalDiscriminator", "DMLLoss", "Distiller", "FSPLoss", "FitNetLoss",
    "GradientATLoss", "KDLoss", "MutualLearning", "NSTLoss", "RKDLoss", "SPLoss", "Term",
    "available_backends", "functional", "make_connector", "recipes",
    # zoo-dense losses
    "CWDLoss", "MGDLoss", "PKDLoss", "make_generation_block",
]
