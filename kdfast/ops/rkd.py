"""The ``"rkd"`` core: per-anchor relational (distance and angle) loss of two embeddings, (B,).

Only the reference is registered (no fused core yet), so ``backend=`` behaves as for every
other loss. A fused implementation would register here with the signature of
:func:`kdfast.reference.rkd.rkd_loss`.
"""

from kdfast import backends
from kdfast.reference.rkd import rkd_loss

CORE = "rkd"

backends.register(CORE, "reference", rkd_loss)
