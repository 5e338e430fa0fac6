"""The ``"cc"`` core: per-row correlation-congruence loss, (B,).

Reference only (the kernel matrices go through the shared batch Gram,
:mod:`kdfast.reference.gram`); a fused implementation would register here with the
signature of :func:`kdfast.reference.cc.cc_loss`.
"""

from kdfast import backends
from kdfast.reference.cc import cc_loss

CORE = "cc"

backends.register(CORE, "reference", cc_loss)
