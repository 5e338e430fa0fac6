"""The ``"ft"`` core: per-sample factor-transfer loss, (B,).

Reference only (an elementwise loss); a fused implementation would register here with the
signature of :func:`kdfast.reference.ft.ft_loss`.
"""

from kdfast import backends
from kdfast.reference.ft import ft_loss

CORE = "ft"

backends.register(CORE, "reference", ft_loss)
