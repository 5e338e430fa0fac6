"""The ``"softmax_kl"`` core: per-sample T^2 * KL(softmax(t/T) || softmax(s/T)) over logits.

Every logit loss (KD, DML, BAN, and the recipes in :mod:`kdfast.recipes`) runs it. Only the
reference is registered for now. A fused kernel (row-wise online softmax for both logits,
loss and gradient in one pass; docs/design.md, "Row-wise softmax-KL") registers itself here
under ``"native"`` / ``"triton"`` with the same signature
``fn(student, teacher, temperature) -> (B,)`` and every logit loss picks it up through
:func:`kdfast.backends.choose`.
"""

from kdfast import backends
from kdfast.reference.kd import kd_loss

CORE = "softmax_kl"

backends.register(CORE, "reference", kd_loss)
