"""Options kept as plain attributes, as in ``torch.nn``, validated on every assignment.

Shared by the loss modules (:class:`kdfast.losses._module.FunctionalLoss`) and the training
drivers of :mod:`kdfast.recipes`.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType


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
