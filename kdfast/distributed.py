"""The global batch across ranks for batch-relational losses (SP, RKD): ``gather=True``.

``gather_batch(x)`` all-gathers ``x`` along dim 0 from every rank of the default process group
with autograd (``torch.distributed._functional_collectives.all_gather_single_autograd``, whose
backward is a sum reduce-scatter; on a torch without it, as 2.4, the then-supported
``torch.distributed.nn.functional.all_gather``, deprecated since): each rank then computes the
loss over the global batch, and the backward sums, into each rank's local slice, the gradients
that every rank's copy of the loss sends it. With DDP, which averages parameter gradients over
the W ranks, that gives exactly the gradient of the global-batch loss:
(1/W) * sum_r (W * dL/dtheta via rank r's samples) = dL/dtheta.
Ranks may hold different batch sizes (the last batch of an epoch): sizes are exchanged first
and the slices padded to the largest, then trimmed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(W * B, ...) concatenation over ranks of every rank's contiguous (B, ...) ``x``; the
    backward sums, over ranks, the gradients that reach each rank's slice."""
    from torch.distributed import _functional_collectives

    gather = getattr(_functional_collectives, "all_gather_single_autograd", None)
    if gather is not None:
        return gather(x, 0, dist.group.WORLD)
    from torch.distributed.nn.functional import all_gather  # older torch, e.g. 2.4

    return torch.cat(all_gather(x))


def gather_batch(x: torch.Tensor) -> torch.Tensor:
    """Concatenation over ranks (rank order) of every rank's ``x``, differentiable.

    Without an initialised process group of more than one rank, returns ``x`` unchanged.
    """
    if not is_distributed():
        return x
    world = dist.get_world_size()
    size = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s.item()) for s in sizes]
    largest = max(sizes)
    padded = x
    if x.shape[0] < largest:
        padding = x.new_zeros((largest - x.shape[0], *x.shape[1:]))
        padded = torch.cat([x, padding])
    pieces = _all_gather_with_grad(padded.contiguous()).split(largest)
    return torch.cat([piece[:n] for piece, n in zip(pieces, sizes, strict=True)])
