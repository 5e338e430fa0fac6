"""The ``"vid"`` core: per-sample VID negative log-likelihood, (B,).

Reference only (an elementwise loss); a fused implementation would register here with the
signature of :func:`kdfast.reference.vid.vid_loss`.
"""

from kdfast import backends
from kdfast.reference.vid import vid_loss

CORE = "vid"

backends.register(CORE, "reference", vid_loss)
