"""Channel MMD (NST): per-sample MMD² over channels-as-samples, see DESIGN.md §3.

Core ``"channel_mmd"``: fn(student (B, C_s, H, W), teacher (B, C_t, H, W), *, kernel, degree,
coef, sigma2 (tuple of floats or "mean"), unbiased, teacher_term) -> (B,). The inputs are
validated and spatially matched by :func:`kdfast.functional.nst_loss`.
"""

from __future__ import annotations

from kdfast import backends
from kdfast.reference.nst import channel_mmd

CORE = "channel_mmd"

backends.register(CORE, "reference", channel_mmd)
