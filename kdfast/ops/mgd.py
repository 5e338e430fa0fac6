"""The ``"mgd"`` core: MGD's per-sample squared error of the generated map and the teacher's,
(N,).

Reference only (one elementwise pass; the work of MGD is in its conv generation block). A
fused implementation would register here with the signature of
:func:`kdfast.reference.mgd.mgd_loss`.
"""

from kdfast import backends
from kdfast.reference.mgd import mgd_loss

CORE = "mgd"

backends.register(CORE, "reference", mgd_loss)
