"""FitNets hint loss: ``fitnet_loss``, ``FitNetLoss`` and the connector builder
``make_connector`` (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from kdfast import _checks, backends
from kdfast.losses._module import FunctionalLoss
from kdfast.ops.fitnet import CORE

FEATURE_NDIMS = (2, 3, 4, 5)


def check_fitnet_options(reduction: str = "mean") -> None:
    _checks.check_choice("reduction", reduction, _checks.REDUCTIONS)


def apply_connector(name: str, student: torch.Tensor, connector: Callable | None
                    ) -> torch.Tensor:
    """``connector(student)`` (checked to be a tensor), or ``student`` when it is None."""
    if connector is None:
        return student
    if not callable(connector):
        raise TypeError(f"connector must be a callable such as an nn.Module mapping {name} "
                        f"to the teacher's shape, got {type(connector).__name__}")
    out = connector(student)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"connector({name}) must return a torch.Tensor, got "
                        f"{type(out).__name__}")
    return out


def fitnet_loss(student: torch.Tensor, teacher: torch.Tensor, *,
                connector: Callable | None = None, reduction: str = "mean",
                backend: str | None = None) -> torch.Tensor:
    r"""FitNets hint loss (Romero et al., 2015).

    .. math::
        \ell_b = \frac{1}{CHW} \sum_{c,h,w} \big(r(s)_{b,c,h,w} - t_{b,c,h,w}\big)^2

    with :math:`r` the ``connector`` (the paper's regressor; identity when None).
    ``reduction="mean"`` (default) averages over the batch, which is the global mean
    ``F.mse_loss(r(s), t)`` of RepDistiller.

    Args:
        student: (B, ...) student features (usually (B, C_s, H_s, W_s)).
        teacher: (B, ...) teacher features; must have exactly the shape of ``r(student)``.
        connector: a callable (usually the trainable module from :func:`make_connector`)
            applied to ``student`` first; default None (shapes must then match).
        reduction: ``"mean"`` | ``"sum"`` over the batch, or ``"none"`` for (B,) losses.
        backend: ``None``/``"auto"``/``"reference"`` (no fused core; ``"native"`` and
            ``"triton"`` raise).

    Example:
        >>> s, t = torch.randn(8, 32, 16, 16), torch.randn(8, 64, 8, 8)
        >>> r = kdfast.make_connector(s.shape, t.shape)
        >>> kdfast.functional.fitnet_loss(s, t, connector=r)  # doctest: +SKIP
    """
    check_fitnet_options(reduction)
    _checks.check_tensor("student", student, FEATURE_NDIMS, "(B, ...)")
    _checks.check_tensor("teacher", teacher, FEATURE_NDIMS, "(B, ...)")
    _checks.check_same_batch(student, teacher)
    regressed = apply_connector("student", student, connector)
    fix = ("pass connector= (a module mapping the student to the teacher's shape, e.g. "
           "kdfast.make_connector(student.shape, teacher.shape) or kdfast.FitNetLoss)")
    name = "student" if connector is None else "connector(student)"
    _checks.check_same_shape(regressed, teacher, (name, "teacher"), fix)
    regressed, teacher = _checks.promote(regressed, teacher)
    per_sample = backends.choose(CORE, backend, regressed, teacher).fn(regressed, teacher)
    return _checks.reduce(per_sample, reduction)


def _channels_and_size(name: str, spec) -> tuple[int, tuple[int, int] | None]:
    """(C, (H, W) or None) from a channel count or a (C, H, W) / (B, C, H, W) shape."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        dims, size = (spec,), None
    elif (isinstance(spec, Sequence) and len(spec) in (3, 4)
          and all(isinstance(d, int) and not isinstance(d, bool) for d in spec)):
        dims = tuple(spec[-3:])
        size = dims[1:]
    else:
        raise TypeError(f"{name} must be a channel count (int) or a feature shape "
                        f"(C, H, W) or (B, C, H, W), got {spec!r}")
    if any(d < 1 for d in dims):
        raise ValueError(f"{name} must have positive channels and sizes, got {spec!r}")
    return dims[0], size


def _connector_conv(c_s: int, c_t: int, s_hw: tuple[int, int], t_hw: tuple[int, int]
                    ) -> nn.Module:
    (h_s, w_s), (h_t, w_t) = s_hw, t_hw
    if s_hw == t_hw:
        return nn.Conv2d(c_s, c_t, kernel_size=1)
    if (h_s, w_s) == (2 * h_t, 2 * w_t):
        return nn.Conv2d(c_s, c_t, kernel_size=3, stride=2, padding=1)
    if (2 * h_s, 2 * w_s) == (h_t, w_t):
        return nn.ConvTranspose2d(c_s, c_t, kernel_size=4, stride=2, padding=1)
    if h_s >= h_t and w_s >= w_t:
        return nn.Conv2d(c_s, c_t, kernel_size=(h_s - h_t + 1, w_s - w_t + 1))
    raise ValueError(f"no connector rule maps a student map of size {s_hw} to the teacher's "
                     f"{t_hw}: supported are equal sizes, student = 2 x teacher, "
                     "teacher = 2 x student, or student larger than teacher in both H and W; "
                     "resize the features or pass your own connector module")


def make_connector(student, teacher, *, relu: bool = True) -> nn.Sequential:
    """The trainable regressor r of FitNets: conv + BatchNorm (+ ReLU), RepDistiller's ConvReg.

    ``student`` and ``teacher`` are both channel counts (then H and W must already match: a
    1x1 conv) or both feature shapes ``(C, H, W)`` / ``(B, C, H, W)``. The conv maps
    C_s -> C_t and H_s -> H_t by the rule:

    * H_s = H_t: 1x1 conv;
    * H_s = 2 H_t: 3x3 conv, stride 2, padding 1;
    * 2 H_s = H_t: 4x4 transposed conv, stride 2, padding 1;
    * H_s > H_t otherwise: valid conv with kernel H_s - H_t + 1 (per dimension);
    * anything else raises ``ValueError``. (W follows the same rule as H.)

    Args:
        student, teacher: channel counts (int) or shapes.
        relu: append a ReLU after the BatchNorm (default True, as RepDistiller's ConvReg);
            use False when the teacher features can be negative (pre-activation).

    The connector's parameters must be trained with the student: give them to the optimiser.

    Example:
        >>> r = kdfast.make_connector((64, 16, 16), (128, 8, 8))  # 3x3 conv, stride 2
        >>> r(torch.randn(2, 64, 16, 16)).shape
        torch.Size([2, 128, 8, 8])
    """
    c_s, s_hw = _channels_and_size("student", student)
    c_t, t_hw = _channels_and_size("teacher", teacher)
    if (s_hw is None) != (t_hw is None):
        raise ValueError("student and teacher must both be channel counts or both be shapes, "
                         f"got {student!r} and {teacher!r}")
    conv = nn.Conv2d(c_s, c_t, kernel_size=1) if s_hw is None else _connector_conv(
        c_s, c_t, s_hw, t_hw)
    layers = [conv, nn.BatchNorm2d(c_t)] + ([nn.ReLU(inplace=False)] if relu else [])
    return nn.Sequential(*layers)


def _shape(channels: int, size) -> tuple[int, ...] | int:
    if size is None:
        return channels
    if isinstance(size, int) and not isinstance(size, bool):
        return (channels, size, size)
    if isinstance(size, Sequence) and len(size) == 2:
        return (channels, *size)
    raise TypeError(f"a feature size must be an int or (H, W), got {size!r}")


_EXTRA_STATE = "_extra_state"  # nn.Module's key for get_extra_state()


def _spec(value):
    """A connector spec in one comparable form: ints, and tuples of ints for shapes."""
    if isinstance(value, (list, tuple)):
        return tuple(_spec(v) for v in value)
    return int(value)


class ConnectorLoss(FunctionalLoss):
    """Base of the losses with a trainable ``connector`` that may be built after construction
    (:meth:`build_connector`, from the first feature shapes; what
    :meth:`kdfast.Distiller.build` calls).

    The state dict records what the connector was built from (its ``_extra_state`` entry:
    ``{"connector": (student, teacher)}``), so that ``load_state_dict`` into a loss without a
    connector builds the same one first — like the checkpoint's tensors in dtype and device —
    and then loads its weights: a checkpoint loads without an example batch. (The weight
    shapes alone would not tell a 3x3 stride-2 conv from a valid 3x3 one.) A loss whose
    connector was built differently gets a load error; a checkpoint without the entry (older
    kdfast) loads into a loss that already has its connector.
    """

    connector: nn.Module | None
    connector_spec: tuple | None  # (student, teacher) as given to _new_connector

    def _new_connector(self, student, teacher) -> nn.Module:
        raise NotImplementedError

    def _set_connector(self, student, teacher) -> None:
        self.connector = self._new_connector(student, teacher)
        self.connector_spec = _spec((student, teacher))

    def get_extra_state(self) -> dict:
        return {"connector": self.connector_spec}

    def set_extra_state(self, state) -> None:
        pass  # read by _load_from_state_dict, which also sees the connector's weights

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        key = prefix + _EXTRA_STATE
        state = state_dict.get(key)
        saved = state.get("connector") if isinstance(state, dict) else None
        if saved is not None:
            saved = _spec(saved)
            if self.connector is None:
                self._set_connector(*saved)
                weights = [v for k, v in state_dict.items()
                           if k.startswith(prefix + "connector.") and v.is_floating_point()]
                if weights:
                    self.connector.to(device=weights[0].device, dtype=weights[0].dtype)
            elif saved != self.connector_spec:
                error_msgs.append(
                    f"{prefix}connector: the checkpoint's was built for (student, teacher) = "
                    f"{saved} but this {type(self).__name__} has one for "
                    f"{self.connector_spec}; construct the loss like the saved one, or without "
                    "a connector (the checkpoint then builds it)")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if state is None and key in missing_keys:
            missing_keys.remove(key)  # a checkpoint from before the entry existed


class FitNetLoss(ConnectorLoss):
    """FitNets hint loss with its trainable connector, :func:`kdfast.functional.fitnet_loss`.

    ``forward(student, teacher)`` = ``fitnet_loss(student, teacher, connector=self.connector,
    reduction=...)``.

    Args:
        student_channels, teacher_channels: build ``self.connector`` =
            ``make_connector(...)`` mapping the student to the teacher (both or neither; with
            neither, default, there is no connector and shapes must match).
        student_size, teacher_size: H (int) or (H, W) of the maps, to pick the connector's
            conv by the rule of :func:`make_connector` (default None: sizes equal, 1x1 conv).
        relu: ReLU after the connector's BatchNorm (default True, RepDistiller).
        reduction: ``"mean"`` (default) | ``"sum"`` | ``"none"``.
        backend: as in :func:`kdfast.functional.fitnet_loss`.

    The connector is a submodule: train it with the student, e.g.
    ``torch.optim.SGD(list(student.parameters()) + list(loss.parameters()), lr=...)``, and
    move the loss with ``.to(device)``. ``reduction`` and ``backend`` are attributes, checked
    on assignment.

    Example:
        >>> loss = kdfast.FitNetLoss.from_shapes((8, 32, 16, 16), (8, 64, 8, 8))
        >>> loss(torch.randn(8, 32, 16, 16), torch.randn(8, 64, 8, 8))  # doctest: +SKIP
    """

    function = staticmethod(fitnet_loss)
    validate = staticmethod(check_fitnet_options)

    def __init__(self, student_channels: int | None = None, teacher_channels: int | None = None,
                 student_size: int | tuple[int, int] | None = None,
                 teacher_size: int | tuple[int, int] | None = None, *, relu: bool = True,
                 reduction: str = "mean", backend: str | None = None) -> None:
        super().__init__(reduction=reduction, backend=backend)
        _checks.check_flag("relu", relu)
        if (student_channels is None) != (teacher_channels is None):
            raise ValueError("pass both student_channels and teacher_channels (to build a "
                             "connector) or neither")
        if (student_size is None) != (teacher_size is None):
            raise ValueError("pass both student_size and teacher_size or neither")
        if student_channels is None and student_size is not None:
            raise ValueError("student_size/teacher_size need student_channels and "
                             "teacher_channels")
        self.relu = relu  # of a connector built later by build_connector
        self.connector = self.connector_spec = None
        if student_channels is not None:
            self._set_connector(_shape(student_channels, student_size),
                                _shape(teacher_channels, teacher_size))

    def build_connector(self, student_shape, teacher_shape) -> bool:
        """Creates the connector from observed (B, C, H, W) feature shapes when there is none
        and the shapes differ (what :meth:`kdfast.Distiller.build` calls); True if built."""
        if self.connector is not None or tuple(student_shape[1:]) == tuple(teacher_shape[1:]):
            return False
        self._set_connector(tuple(student_shape[1:]), tuple(teacher_shape[1:]))
        return True

    def _new_connector(self, student, teacher) -> nn.Module:
        return make_connector(student, teacher, relu=self.relu)

    @classmethod
    def from_shapes(cls, student_shape, teacher_shape, **options) -> FitNetLoss:
        """The loss with a connector for features of these (B, C, H, W) or (C, H, W) shapes."""
        c_s, s_hw = _channels_and_size("student_shape", student_shape)
        c_t, t_hw = _channels_and_size("teacher_shape", teacher_shape)
        if s_hw is None or t_hw is None:
            raise TypeError("student_shape and teacher_shape must be (C, H, W) or (B, C, H, W)")
        return cls(c_s, c_t, s_hw, t_hw, **options)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return fitnet_loss(student, teacher, connector=self.connector, **self._option_values())
