"""The ``"pkt"`` core: per-row PKT loss of two embeddings, (B,).

Reference only (the cosine-similarity matrices go through the shared batch Gram,
:mod:`kdfast.reference.gram`); a fused implementation would register here with the
signature of :func:`kdfast.reference.pkt.pkt_loss`.
"""

from kdfast import backends
from kdfast.reference.pkt import pkt_loss

CORE = "pkt"

backends.register(CORE, "reference", pkt_loss)
