"""The ``"dist"`` core: per-sample DIST values (inter- and intra-class Pearson correlation of
softened predictions), (B,).

Only the reference is registered: the correlations are row-wise dot products of matched
rows (the diagonal of a Gram matrix, not the Gram itself), cheap elementwise work that the
batch Gram core would not speed up. A fused implementation would register here with the
signature of :func:`kdfast.reference.dist.dist_loss`.
"""

from kdfast import backends
from kdfast.reference.dist import dist_loss

CORE = "dist"

backends.register(CORE, "reference", dist_loss)
