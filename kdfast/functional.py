"""The losses as functions, ``torch.nn.functional`` style: ``loss(student, teacher, **options)``.

Each function validates its inputs, matches spatial sizes where the loss allows it, picks the
backend of its fused core (``backend=`` / ``KDFAST_BACKEND`` / auto, see
:mod:`kdfast.backends`) and applies ``reduction``.
"""

from kdfast.losses.ab import ab_loss
from kdfast.losses.adversarial import adversarial_student_loss, discriminator_loss
from kdfast.losses.attention import at_loss
from kdfast.losses.ban import ban_generation_loss
from kdfast.losses.dml import dml_loss
from kdfast.losses.fitnet import fitnet_loss
from kdfast.losses.fsp import fsp_loss
from kdfast.losses.gradient_attention import gradient_at_loss
from kdfast.losses.kd import kd_loss
from kdfast.losses.nst import nst_loss
from kdfast.losses.rkd import rkd_loss
from kdfast.losses.sp import sp_loss

# isort: split
# zoo-dense losses
from kdfast.losses.cwd import cwd_loss
from kdfast.losses.mgd import mgd_loss
from kdfast.losses.pkd import pkd_loss

__all__ = [
    "ab_loss", "adversarial_student_loss", "at_loss", "ban_generation_loss", "discriminator_loss",
    "dml_loss", "fitnet_loss", "fsp_loss", "gradient_at_loss", "kd_loss", "nst_loss", "rkd_loss",
    "sp_loss",
    # zoo-dense losses
    "cwd_loss", "mgd_loss", "pkd_loss",
]
