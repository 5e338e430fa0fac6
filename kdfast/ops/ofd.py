"""The ``"ofd"`` core: per-sample partial L2 of OFD against the teacher's margins, (B,).

Only the reference is registered (a cheap elementwise loss), so ``backend=`` behaves as for
every other loss. A fused implementation would register here with the signature of
:func:`kdfast.reference.ofd.partial_l2`.
"""

from kdfast import backends
from kdfast.reference.ofd import partial_l2

CORE = "ofd"

backends.register(CORE, "reference", partial_l2)
