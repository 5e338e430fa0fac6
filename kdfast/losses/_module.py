"""The shared shape of every loss module: hyper-parameters in, the functional form out.

Options are plain attributes, as in ``torch.nn`` (``kdfast.KDLoss(temperature=4).temperature``),
checked at construction and again on every assignment: a bad value fails at the line that sets
it, with the message the function gives, and a new value (a temperature schedule,
``criterion.temperature = 1.0``) takes effect at the next call. Validating on assignment rather
than only at forward puts the error where the mistake is; the functions the modules call check
their options once more at each call, so nothing unchecked ever runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from torch import nn

from kdfast import _checks


class OptionAttributes:
    """Options kept as plain attributes and validated on every assignment.

    A class sets its options once with :meth:`_set_options` (after which assigning one of
    them validates the whole set with the new value, so options that constrain each other stay
    consistent) and says how to check them in :meth:`_check_options`.
    """

    _option_names: tuple[str, ...] = ()

    def _check_options(self, options: dict) -> None:
        raise NotImplementedError

    def _set_options(self, **options) -> None:
        self._check_options(options)
        for name, value in options.items():
            super().__setattr__(name, value)
        super().__setattr__("_option_names", self._option_names + tuple(options))

    def _option_values(self) -> dict:
        return {name: getattr(self, name) for name in self._option_names}

    @property
    def options(self) -> Mapping:
        """The options by name, read-only: assign the attribute to change one."""
        return MappingProxyType(self._option_values())

    def __setattr__(self, name: str, value) -> None:
        if name in self._option_names:
            self._check_options({**self._option_values(), name: value})
        super().__setattr__(name, value)


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
