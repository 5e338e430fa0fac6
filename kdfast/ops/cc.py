"""The ``"cc"`` core: per-row correlation-congruence loss, (B,).

Reference only. The batch Gram core that SP runs on (``"similarity"``,
:mod:`kdfast.ops.gram`) does not fit CC as it is: it is SP's whole loss, not a Gram — its
kernels take Q Q^T, row-normalise it and return sum_j (G_t - G_s)^2_ij / B per row. CC's
default (torchdistill's ``CCKDLoss``) needs the raw Gram, an entry-wise Taylor polynomial of
it (the Gaussian kernel) and the Frobenius norm, not squared, of the difference — a batch
statistic over every row; RepDistiller's variant has no kernel matrix at all. What they share
is the one product Q Q^T, which the reference already takes from
:mod:`kdfast.reference.gram` (a single matmul); a "native" CC of that matmul and the
reference's elementwise epilogue would be the reference under another name, so none is
registered. A fused implementation would register here with the signature of
:func:`kdfast.reference.cc.cc_loss`.
"""

from kdfast import backends
from kdfast.reference.cc import cc_loss

CORE = "cc"

backends.register(CORE, "reference", cc_loss)
