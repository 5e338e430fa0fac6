"""The shared shape of every loss module: hyper-parameters in, the functional form out.

Options are plain attributes, as in ``torch.nn`` (``kdfast.KDLoss(temperature=4).temperature``),
checked at construction and again on every assignment: a bad value fails at the line that sets
it, with the message the function gives, and a new value (a temperature schedule,
``criterion.temperature = 1.0``) takes effect at the next call. Validating on assignment rather
than only at forward puts the error where the mistake is; the functions the modules call check
their options once more at each call, so nothing unchecked ever runs.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from kdfast import _checks
from kdfast._options import OptionAttributes


class FunctionalLoss(OptionAttributes, nn.Module):
    """An ``nn.Module`` that calls ``function(*inputs, **options)``.

    Subclasses spell out their hyper-parameters (with defaults) in ``__init__`` and pass them
    here; each becomes an attribute, checked by ``validate`` (and ``backend=`` by the rule of
    :mod:`kdfast.backends`) at construction and on assignment.
    """

    function: Callable
    validate: Callable | None = None

    def __init__(self, **options) -> None:
        super().__init__()
        self._set_options(**options)

    def _check_options(self, options: dict) -> None:
        _checks.check_backend(options.get("backend"))
        if type(self).validate is not None:
            type(self).validate(**{k: v for k, v in options.items() if k != "backend"})

    def forward(self, *inputs):
        return type(self).function(*inputs, **self._option_values())

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self._option_values().items())
