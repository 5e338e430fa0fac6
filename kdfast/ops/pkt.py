"""The ``"pkt"`` core: per-row PKT loss of two embeddings, (B,).

Reference only. The batch Gram core that SP runs on (``"similarity"``,
:mod:`kdfast.ops.gram`) does not fit PKT as it is: it is SP's whole loss, not a Gram — its
native and Triton kernels take Q Q^T, row-normalise it by the Gram's own row norms and return
sum_j (G_t - G_s)^2_ij / B per row, with that epilogue fused. PKT needs another matrix and
another epilogue: the Gram of the rows divided by (||q_i|| + eps) (the feature norms, not the
Gram's row norms), then (K + 1) / 2, each row divided by its sum, and a KL with eps inside the
log. What the two share is the one product Q Q^T, which the reference already takes from
:mod:`kdfast.reference.gram` (a single matmul); a "native" PKT built from that matmul and the
reference's elementwise epilogue would be the reference under another name, so none is
registered. A fused implementation (its own epilogue kernel) would register here with the
signature of :func:`kdfast.reference.pkt.pkt_loss`.
"""

from kdfast import backends
from kdfast.reference.pkt import pkt_loss

CORE = "pkt"

backends.register(CORE, "reference", pkt_loss)
