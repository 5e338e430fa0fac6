"""The ``"pkd"`` core: PKD's per-sample loss of two (N, C, H, W) maps of one shape, (N,).

Reference only (elementwise work after two per-channel reductions; no fused core). A fused
implementation would register here with the signature of
:func:`kdfast.reference.pkd.pkd_loss`.
"""

from kdfast import backends
from kdfast.reference.pkd import pkd_loss

CORE = "pkd"

backends.register(CORE, "reference", pkd_loss)
