"""The ``"crd"`` core: per-sample NCE loss of CRD against rows of the two memory banks, (B,).

Only the reference is registered (one batched dot product per side), so ``backend=`` behaves
as for every other loss. A fused implementation would register here with the signature of
:func:`kdfast.reference.crd.crd_loss`.
"""

from kdfast import backends
from kdfast.reference.crd import crd_loss

CORE = "crd"

backends.register(CORE, "reference", crd_loss)
