"""The ``"fitnet"`` core: the FitNets hint loss between regressed student and teacher features.

Only the reference is registered (an elementwise loss, no fused core), so ``backend=``
behaves as for every other loss. A fused implementation would register here with the
signature of :func:`kdfast.reference.fitnet.hint_loss`.
"""

from kdfast import backends
from kdfast.reference.fitnet import hint_loss

CORE = "fitnet"

backends.register(CORE, "reference", hint_loss)
