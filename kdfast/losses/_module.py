"""The shared shape of every loss module: hyper-parameters in, the functional form out."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


class FunctionalLoss(nn.Module):
    """An ``nn.Module`` that calls ``function(*inputs, **options)``.

    Subclasses spell out their hyper-parameters (with defaults) in ``__init__`` and pass them
    here; ``validate`` checks them once at construction so a bad option fails early.
    """

    function: Callable
    validate: Callable | None = None

    def __init__(self, **options) -> None:
        super().__init__()
        if type(self).validate is not None:
            type(self).validate(**{k: v for k, v in options.items() if k != "backend"})
        self.options = options

    def forward(self, *inputs):
        return type(self).function(*inputs, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())
