"""The ``"kdsvd"`` core: per-sample KDSVD loss over a list of feature maps, (B,).

Reference only (``torch.linalg.svd``); a fused implementation would register here with the
signature of :func:`kdfast.reference.kdsvd.kdsvd_loss`.
"""

from kdfast import backends
from kdfast.reference.kdsvd import kdsvd_loss

CORE = "kdsvd"

backends.register(CORE, "reference", kdsvd_loss)
