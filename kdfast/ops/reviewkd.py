"""The ``"hcl"`` core: the hierarchical context loss of ReviewKD over a list of stages, (B,).

Only the reference is registered (a few poolings and squared errors per stage), so
``backend=`` behaves as for every other loss. A fused implementation would register here with
the signature of :func:`kdfast.reference.reviewkd.hierarchical_context_loss`.
"""

from kdfast import backends
from kdfast.reference.reviewkd import hierarchical_context_loss

CORE = "hcl"

backends.register(CORE, "reference", hierarchical_context_loss)
