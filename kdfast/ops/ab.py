"""The ``"ab"`` core: the activation-boundary loss of connected student and teacher
pre-activations.

Only the reference is registered (an elementwise loss, no fused core), so ``backend=``
behaves as for every other loss. A fused implementation would register here with the
signature of :func:`kdfast.reference.ab.ab_loss`.
"""

from kdfast import backends
from kdfast.reference.ab import ab_loss

CORE = "ab"

backends.register(CORE, "reference", ab_loss)
