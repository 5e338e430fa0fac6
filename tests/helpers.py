"""Shared test tools: relative errors, poisoned outputs and fresh random inputs."""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from kdfast import backends


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (absolute error when ref is 0)."""
    out, ref = out.detach().double(), ref.detach().double()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "",
                     atol: float = 1e-13) -> None:
    """||out - ref|| <= tol * ||ref|| + atol (atol covers a reference that is exactly 0 in
    exact arithmetic, e.g. the gradient of a normalised one-element map, where both sides
    hold only rounding noise)."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    diff = (out.detach().double() - ref.detach().double()).norm().item()
    bound = tol * ref.detach().double().norm().item() + atol
    assert diff <= bound, (f"{what}: |out - ref| = {diff:.3e} > {bound:.3e} "
                           f"(relative error {rel_err(out, ref):.3e}, tol {tol:.1e})")


REDUCTIONS = ("mean", "sum", "none")


def reduced(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    """What ``reduction=`` should turn these per-sample losses into, written out here rather
    than taken from kdfast (which is what the tests check)."""
    if reduction == "none":
        return per_sample
    return per_sample.mean() if reduction == "mean" else per_sample.sum()


def randn(*shape, dtype=torch.float64, seed: int | None = None, requires_grad=False):
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    x = torch.randn(*shape, dtype=dtype, generator=generator)
    return x.requires_grad_(requires_grad)


def toy_problem(seed: int = 0, n: int = 32, dim: int = 4, classes: int = 3):
    """A learnable classification batch: float64 inputs (n, dim) and the labels (n,) of a
    random linear classifier on them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    y = (x @ torch.randn(dim, classes, generator=g, dtype=torch.float64)).argmax(1)
    return x, y


def grads(loss: torch.Tensor, inputs, grad_output: float = 1.0):
    """Gradients of ``loss * grad_output`` w.r.t. ``inputs`` (None for unused ones)."""
    return torch.autograd.grad(loss, inputs, grad_outputs=torch.full_like(loss, grad_output),
                               allow_unused=True)


def dtype_tolerance(fn, inputs64, dtype, atol: float = 1e-3) -> float:
    """Tolerance for a kernel run in ``dtype``: twice PyTorch's own relative error when
    ``fn`` (the reference) runs in that dtype, plus ``atol``; ``fn`` returns one tensor."""
    exact = fn(*inputs64)
    low = fn(*(x.detach().to(dtype) for x in inputs64))
    return 2.0 * rel_err(low, exact) + atol


@contextlib.contextmanager
def tf32_matmul(enabled: bool):
    """Sets ``torch.backends.cuda.matmul.allow_tf32`` and restores it by assignment.

    Not pytest's monkeypatch: from pytest 9.2 its undo deletes the attribute, which lives
    behind the module object's ``__getattr__`` and cannot be deleted.
    """
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        matmul.allow_tf32 = saved


def spy_on_backend(monkeypatch, core: str, backend: str) -> list[tuple]:
    """Replaces the registered ``backend`` implementation of ``core`` by one that records
    each call's arguments, then runs the original; returns the record, so that a test can
    assert that this backend (and not the reference) ran."""
    impl = backends.implementations(core)[backend]
    calls: list[tuple] = []

    def recorded(*args, **kwargs):
        calls.append(args)
        return impl.fn(*args, **kwargs)
    monkeypatch.setitem(backends._REGISTRY[core], backend, dataclasses.replace(impl, fn=recorded))
    return calls
