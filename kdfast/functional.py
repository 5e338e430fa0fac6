"""The losses as functions, ``torch.nn.functional`` style: ``loss(student, teacher, **options)``.

Each function validates its inputs, matches spatial sizes where the loss allows it, picks the
backend of its fused core (``backend=`` / ``KDFAST_BACKEND`` / auto, see
:mod:`kdfast.backends`) and applies ``reduction``.
"""

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
from kdfast.losses.ft import ft_loss, paraphraser_reconstruction_loss
from kdfast.losses.fused_linear_kd import fused_linear_kd_loss
from kdfast.losses.gradient_attention import gradient_at_loss
from kdfast.losses.kd import kd_loss
from kdfast.losses.kdsvd import kdsvd_loss
from kdfast.losses.lskd import lskd_loss
from kdfast.losses.mgd import mgd_loss
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

__all__ = [
    "ab_loss", "adversarial_student_loss", "at_loss", "ban_generation_loss", "cc_loss", "crd_loss",
    "cwd_loss", "discriminator_loss", "dist_loss", "dkd_loss", "dml_loss", "fitnet_loss",
    "fsp_loss", "ft_loss", "fused_linear_kd_loss", "gradient_at_loss", "hcl_loss", "kd_loss",
    "kdsvd_loss", "lskd_loss", "mgd_loss", "nst_loss", "ofd_loss", "ofd_margin",
    "paraphraser_reconstruction_loss", "pkd_loss", "pkt_loss", "rkd_loss", "sp_loss", "srd_loss",
    "vid_loss", "wsld_loss",
]
