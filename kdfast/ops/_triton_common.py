"""What the Triton op layers of the cores share (``torch.library`` custom operators in the
``kdfast_triton`` namespace, their fakes and autograd Functions in ``kdfast/ops/<core>.py``).

Each fused core is two operators, a forward that returns the result and what the backward
needs, and a backward that returns the input gradients (an empty tensor for an input that
needs none). Dynamo and AOTAutograd treat them as opaque calls with the shapes given by their
fake implementations, so a Triton core traces into a ``torch.compile`` graph
(``fullgraph=True`` included) like the native operators do, and the kernels run unchanged
inside the compiled code. An operator's body imports its launcher module
(``kdfast.triton.<core>``, and with it Triton) on its first call, so importing kdfast never
imports Triton. This module imports only torch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdfast._precision import accumulation_dtype

TRITON_NAMESPACE = "kdfast_triton"


def empty_accumulation(like: Tensor, *shape: int) -> Tensor:
    """An empty tensor of ``shape`` in ``like``'s compute (accumulation) dtype."""
    return like.new_empty(shape, dtype=accumulation_dtype(like))


def grad_or_empty(x: Tensor, needed: bool) -> Tensor:
    """A gradient-shaped empty tensor for ``x`` when ``needed``, else an empty one (a backward
    operator returns a tensor for every input, needed or not)."""
    return torch.empty_like(x) if needed else x.new_empty(0)


def dense_rows(x: Tensor) -> Tensor:
    """``x`` if each sample is one dense block of D elements (contiguous or channels_last),
    else a contiguous copy; row b then lives at b * D + k, k < D, in some fixed order."""
    if x.is_contiguous():
        return x
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return x
    return x.contiguous()
