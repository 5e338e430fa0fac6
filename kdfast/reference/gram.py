"""The batch Gram matrix shared by the relation losses (SP, PKT, CC).

For (B, ...) features flattened to Q (B x D), the Gram G = Q Q^T (B x B) holds every pairwise
inner product of the batch; SP row-normalises it, PKT takes it of unit rows (cosine
similarities), CC expands a Gaussian kernel in its powers. Computed in float32 for
float16/bfloat16 inputs (a float16 Q Q^T overflows at ordinary D).
"""

import torch

from kdfast.reference.numerics import upcast_low_precision


def batch_gram(features: torch.Tensor) -> torch.Tensor:
    """G = Q Q^T, shape (B, B), Q the (B, ...) features flattened to (B, D)."""
    q = upcast_low_precision(features).reshape(features.shape[0], -1)
    return q @ q.t()


def cosine_gram(features: torch.Tensor, eps: float) -> torch.Tensor:
    """Cosine similarities of the rows, (B, B): the Gram of q_i / (||q_i|| + eps).

    ``eps`` is added to the norm (PKT's convention, not a max), so an all-zero row gives a
    zero row and column, never NaN.
    """
    q = upcast_low_precision(features).reshape(features.shape[0], -1)
    return batch_gram(q / (torch.linalg.vector_norm(q, dim=1, keepdim=True) + eps))
