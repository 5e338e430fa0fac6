"""Input validation shared by every loss: clear errors that name the argument and the fix.

Nothing here broadcasts or silently reshapes: a tensor that is not what the loss needs raises
``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong shape, size, device, option).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kdfast._precision import upcast_low_precision
from kdfast.backends import BACKENDS

REDUCTIONS = ("mean", "sum", "none")


def check_tensor(name: str, tensor, ndim: int | Sequence[int], layout: str = "") -> torch.Tensor:
    """``tensor`` must be a non-empty floating-point tensor with ``ndim`` dimensions."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not (tensor.is_floating_point()):
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}; "
                        f"convert it with {name}.float()")
    allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if tensor.dim() not in allowed:
        want = " or ".join(f"{d}-D" for d in allowed)
        hint = f" {layout}" if layout else ""
        raise ValueError(f"{name} must be {want}{hint}, got shape {tuple(tensor.shape)}")
    if tensor.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(tensor.shape)}); every dimension "
                         "must be at least 1")
    return tensor


def check_features(name: str, tensor) -> torch.Tensor:
    return check_tensor(name, tensor, 4, "(B, C, H, W)")


def check_logits(name: str, tensor) -> torch.Tensor:
    return check_tensor(name, tensor, 2, "(B, num_classes)")


def check_same_batch(student: torch.Tensor, teacher: torch.Tensor,
                     names: tuple[str, str] = ("student", "teacher")) -> None:
    if student.device != teacher.device:
        raise ValueError(f"{names[0]} is on {student.device} but {names[1]} is on "
                         f"{teacher.device}; move both to one device with .to(device)")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"{names[0]} and {names[1]} must have the same batch size, got "
                         f"{student.shape[0]} and {teacher.shape[0]}")


def check_same_shape(student: torch.Tensor, teacher: torch.Tensor,
                     names: tuple[str, str] = ("student", "teacher"), fix: str = "") -> None:
    check_same_batch(student, teacher, names)
    if student.shape != teacher.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}"
                         + (f"; {fix}" if fix else ""))


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def check_real(name: str, value) -> float:
    """``value`` as a float: any finite real number (Python, NumPy, ``fractions``), not a
    bool."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    number = float(value)
    # A comparison, not math.isfinite: under torch.compile a changed float option is traced
    # as a symbolic float, which comparisons guard on and isfinite cannot take.
    if not abs(number) < math.inf:
        raise ValueError(f"{name} must be a finite number, got {number}")
    return number


def check_positive(name: str, value, minimum: float = 0.0, inclusive: bool = False) -> float:
    """``value`` as a float: a finite real number > ``minimum`` (>= with ``inclusive``)."""
    number = check_real(name, value)
    if not (number >= minimum if inclusive else number > minimum):
        relation = ">=" if inclusive else ">"
        raise ValueError(f"{name} must be {relation} {minimum}, got {number}")
    return number


def check_backend(backend) -> None:
    """``backend`` must be None or one of :data:`kdfast.backends.BACKENDS` (the message
    :func:`kdfast.backends.choose` gives, here at construction or before any work)."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")


def promoted_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """``torch.promote_types`` over the dtypes of ``tensors``."""
    return functools.reduce(torch.promote_types, (tensor.dtype for tensor in tensors))


def promote(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The dtype rule of every loss: ``tensors`` (all tensor inputs of one loss, checked to be
    floating point) in their promoted dtype, ``torch.promote_types`` of theirs.

    Called before dispatch, so a core sees one dtype (a bf16 teacher with an fp32 student is
    computed in fp32). The loss is then returned in the accumulation dtype of that dtype (fp64
    for fp64, else fp32, :func:`reduce`); gradients flow back through ``.to`` to each input in
    its own dtype. Inputs already in the promoted dtype are returned as they are.
    """
    dtype = promoted_dtype(*tensors)
    return tuple(tensor if tensor.dtype == dtype else tensor.to(dtype) for tensor in tensors)


def match_spatial(student: torch.Tensor, teacher: torch.Tensor, pool: bool,
                  names: tuple[str, str] = ("student", "teacher")
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pools the larger of two (B, C, H, W) maps down to the smaller one's size.

    Pooling needs each of H and W of the larger map to be a whole multiple of the smaller's
    (the ResNet stage ratios); anything else raises instead of resampling silently. ``names``
    are the two arguments as the error messages call them.
    """
    s_hw, t_hw = tuple(student.shape[-2:]), tuple(teacher.shape[-2:])
    if s_hw == t_hw:
        return student, teacher
    first, second = names
    if not pool:
        raise ValueError(f"{first} spatial size {s_hw} differs from {second}'s {t_hw} and "
                         "pool=False; pass pool=True to average-pool the larger map, or "
                         "resize one of them")
    s_larger = s_hw[0] >= t_hw[0] and s_hw[1] >= t_hw[1]
    t_larger = t_hw[0] >= s_hw[0] and t_hw[1] >= s_hw[1]
    big, small = (s_hw, t_hw) if s_larger else (t_hw, s_hw)
    if not (s_larger or t_larger) or big[0] % small[0] or big[1] % small[1]:
        raise ValueError(f"{first} spatial size {s_hw} and {second}'s {t_hw} cannot be "
                         "matched by average pooling (the larger must be a whole multiple of "
                         "the smaller in H and W); resize one of them with F.interpolate")
    kernel = (big[0] // small[0], big[1] // small[1])
    if s_larger:
        return F.avg_pool2d(student, kernel), teacher
    return student, F.avg_pool2d(teacher, kernel)


def reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    """Applies ``reduction`` ("mean", "sum" or "none") to a vector of per-sample losses."""
    check_choice("reduction", reduction, REDUCTIONS)
    per_sample = upcast_low_precision(per_sample)  # fp32 losses for fp16/bf16 inputs
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def check_labels(name: str, labels, batch: int, num_classes: int,
                 device: torch.device | None = None) -> torch.Tensor:
    """``labels`` must be a (batch,) integer tensor of class indices in [0, num_classes).

    Returned as int64 (what ``F.cross_entropy`` and ``F.one_hot`` take). The range check reads
    the values (a device sync on CUDA); it is skipped on the ``meta`` device, which has none,
    and while ``torch.compile`` traces (a data-dependent branch would break the graph).
    """
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of class indices, got "
                        f"{type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class indices, got dtype {labels.dtype}; "
                        f"pass {name}.argmax(dim=1) for one-hot or soft labels, or "
                        f"{name}.long() for whole numbers stored as floats")
    if labels.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) (one class index per sample), "
                         f"got {tuple(labels.shape)}")
    if device is not None and labels.device != device:
        raise ValueError(f"{name} is on {labels.device} but the logits are on {device}; move "
                         f"it with {name}.to(device)")
    if labels.numel() and labels.device.type != "meta" and not torch.compiler.is_compiling():
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            raise ValueError(f"{name} must be class indices in [0, {num_classes - 1}] "
                             f"(num_classes={num_classes}), got values in [{low}, {high}]")
    return labels.long()


def check_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int: a whole number type (Python or NumPy, not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def check_min_classes(name: str, logits: torch.Tensor, minimum: int, why: str) -> None:
    """(B, num_classes) ``logits`` must have at least ``minimum`` classes; ``why`` says what
    needs them."""
    if logits.shape[1] < minimum:
        raise ValueError(f"{name} has {logits.shape[1]} class(es) but {why} needs at least "
                         f"{minimum}; pass logits over {minimum} or more classes")
