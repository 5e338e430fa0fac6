"""Value-and-gradient parity of a Triton core against its reference, with the core's keyword
options and a choice of the inputs whose gradients are compared."""

from __future__ import annotations

import functools

from tests.helpers import FLOAT64_RTOL, assert_matches_reference


def check_parity(fn, ref, inputs, tol: float = FLOAT64_RTOL, grad_inputs=None, **options):
    """``fn(*inputs, **options)`` against ``ref`` by :func:`tests.helpers.
    assert_matches_reference` (float64 within ``tol``; below it the suite's one rule),
    comparing the gradients of the inputs in ``grad_inputs`` (default: all), which must keep
    a channels_last input's strides. Returns the Triton output."""
    wanted = range(len(inputs)) if grad_inputs is None else grad_inputs
    leaves = [x.detach().requires_grad_(i in wanted) for i, x in enumerate(inputs)]
    return assert_matches_reference(functools.partial(fn, **options),
                                    functools.partial(ref, **options), leaves, rtol64=tol,
                                    keep_channels_last=True)[0]
