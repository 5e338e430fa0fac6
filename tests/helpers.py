"""Shared test tools: relative errors, poisoned outputs and fresh random inputs."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os

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


# --- the one value-and-gradient comparer -----------------------------------------------

# Float64 runs are compared with FLOAT64_RTOL alone. Below float64 one rule holds: the fast
# path's error against the float64 reference is at most twice PyTorch's own error (the
# reference run in that dtype, against the reference in float64), plus the dtype's relative
# floor (so that an error of 0 in torch, e.g. an input exactly representable, does not demand
# 0 of the fast path).
FLOAT64_RTOL = 1e-10
LOW_PRECISION_FLOORS = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}
# An output that is 0 in exact arithmetic holds rounding noise on both sides: this many ulps
# of the accumulation dtype (see rounding_noise).
NOISE_ULPS = 1e3


def low_precision_rtol(reference_in_dtype: torch.Tensor, reference: torch.Tensor,
                       floor: float) -> float:
    """The rule's relative tolerance: twice the reference's own relative error in a dtype
    (``reference_in_dtype`` against the float64 ``reference``) plus ``floor``."""
    return 2.0 * rel_err(reference_in_dtype, reference) + floor


def dtype_tolerance(fn, inputs64, dtype, atol: float = 1e-3) -> float:
    """The relative tolerance of the low-precision rule for ``fn`` (the reference, one tensor
    out) run in ``dtype``, with the floor ``atol``."""
    exact = fn(*inputs64)
    return low_precision_rtol(fn(*(x.detach().to(dtype) for x in inputs64)), exact, atol)


def rounding_noise(dtype: torch.dtype, inputs, grad_output: torch.Tensor | None,
                   value: bool) -> float:
    """A bound on the rounding noise of an output that is 0 in exact arithmetic: NOISE_ULPS
    ulps of the accumulation dtype (float64 for float64, else float32), times max|grad_output|
    and ||1/x|| for a gradient (the fused losses are scale-invariant, so the noise in their
    vanishing gradients grows like eps/|x|)."""
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    if value:
        return NOISE_ULPS * eps
    inverse = torch.cat([x.detach().double().abs().reciprocal().flatten() for x in inputs])
    return NOISE_ULPS * eps * grad_output.abs().max().item() * inverse.norm().item()


def fresh_leaves(inputs, to=None):
    """Detached copies of ``inputs`` (``to(x)`` of each when given, else the same tensors'
    values, strides kept) that require grad where the input does."""
    return [(x.detach() if to is None else to(x.detach())).requires_grad_(x.requires_grad)
            for x in inputs]


def value_and_grads(fn, inputs, grad_output):
    """[fn(*inputs), gradient of <fn(*inputs), grad_output(value)> w.r.t. each input that
    requires grad (None where fn does not depend on it)]."""
    value = fn(*inputs)
    wanted = [x for x in inputs if x.requires_grad]
    if not wanted:
        return [value]
    weights = grad_output(value).to(value.device, value.dtype)
    return [value, *torch.autograd.grad(value, wanted, weights, allow_unused=True)]


def seeded_grad_output(seed: int = 0):
    """grad_output of a value: seeded standard normal numbers rounded to the value's dtype."""
    def make(value):
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(value.shape, dtype=torch.float64, generator=generator).to(value.dtype)
    return make


def assert_matches_reference(fast_fn, reference_fn, inputs, *, grad_output=None,
                             rtol64: float = FLOAT64_RTOL, atol: float = 1e-13,
                             degenerate=(False, False), keep_channels_last: bool = False,
                             value_atol: float = 0.0, what: str = "") -> list[torch.Tensor | None]:
    """``fast_fn(*inputs)`` and its gradients against ``reference_fn`` run in float64: the one
    value-and-gradient comparison of the suite.

    ``inputs`` are tensors of one dtype, on the fast path's device and in its layouts; the
    gradients of those that require grad are compared (of the value times
    ``grad_output(value)``; default seeded random numbers in the value's dtype, the same for
    every run). The reference runs on contiguous float64 CPU copies of the same values, and
    for a low precision dtype once more on copies rounded to that dtype: float64 outputs must
    be within ``rtol64`` relative error, lower dtypes within twice the reference's own error
    in that dtype plus the dtype's floor (LOW_PRECISION_FLOORS). Every output must have the
    dtype the reference gives in that dtype, the gradients the shape of their input (and,
    with ``keep_channels_last``, the strides of a channels_last one). ``atol`` is added to
    every bound (a reference that is 0 in exact arithmetic); ``degenerate`` (value,
    gradients) replaces it by the rounding noise (rounding_noise) of such outputs;
    ``value_atol`` is added to the value's bound below float64 (an output whose rounding
    error scales with something larger than itself: LossCases.value_noise).
    Returns the fast path's outputs."""
    dtype = inputs[0].dtype
    resolve = grad_output or seeded_grad_output()
    weights = []  # what the fast run used, reused (in float64) by the reference runs

    def remembered(value):
        weights.append(resolve(value).cpu())
        return weights[0]
    leaves = fresh_leaves(inputs)
    exact = fresh_leaves(inputs, lambda x: x.cpu().double().contiguous())
    got = value_and_grads(fast_fn, leaves, remembered)
    want = value_and_grads(reference_fn, exact, lambda value: weights[0].double())
    in_dtype = want
    if dtype != torch.float64:
        in_dtype = value_and_grads(reference_fn, fresh_leaves(exact, lambda x: x.to(dtype)),
                                   lambda value: weights[0])
    names = ["value"] + [f"gradient of input {i} {tuple(x.shape)}"
                         for i, x in enumerate(inputs) if x.requires_grad]
    grad_inputs = [x for x in leaves if x.requires_grad]
    for i, (name, out, ref, low) in enumerate(zip(names, got, want, in_dtype, strict=True)):
        name = f"{what} {name}".strip()
        if ref is None or out is None:
            assert out is None and ref is None, f"{name}: {out} where the reference has {ref}"
            continue
        assert out.dtype == low.dtype, f"{name}: dtype {out.dtype}, not {low.dtype}"
        if i > 0:
            x = grad_inputs[i - 1]
            assert out.shape == x.shape, f"{name}: shape {tuple(out.shape)}"
            if (keep_channels_last and x.dim() == 4 and not x.is_contiguous()
                    and x.is_contiguous(memory_format=torch.channels_last)):
                assert out.stride() == x.stride(), f"{name}: must keep channels_last"
        rtol = rtol64
        if dtype != torch.float64:
            rtol = low_precision_rtol(low, ref, LOW_PRECISION_FLOORS[dtype])
        noise = atol + (value_atol if i == 0 and dtype != torch.float64 else 0.0)
        if degenerate[min(i, 1)]:
            noise = rounding_noise(dtype, exact, weights[0] if weights else None, value=i == 0)
        assert_rel_close(out.cpu(), ref, rtol, name, noise)
    return got


def triton_device() -> str | None:
    """Where Triton kernels run in this process: "cpu" under the interpreter
    (TRITON_INTERPRET=1, which must be set before Triton is imported), else "cuda" when a
    device is present, else None."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else None


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


def run_docstring_example(obj):
    """Runs the ``>>>`` statements of ``obj``'s docstring (``# doctest: +SKIP`` ignored: those
    examples are skipped by doctest only because their output is random) with ``torch`` and
    ``kdfast`` imported, and returns the value of the last one, an expression."""
    import kdfast  # the examples' namespace, imported here as they assume it

    statements: list[str] = []
    for line in (line.strip() for line in inspect.getdoc(obj).splitlines()):
        text = line[4:].split("# doctest:")[0].rstrip()
        if line.startswith(">>> "):
            statements.append(text)
        elif line.startswith("... ") and statements:
            statements[-1] += "\n" + text
    assert statements, f"{obj.__qualname__} has no example"
    namespace = {"torch": torch, "kdfast": kdfast}
    exec(compile("\n".join(statements[:-1]), f"<{obj.__qualname__} example>", "exec"), namespace)
    return eval(statements[-1], namespace)


def docstring_example_loss(obj) -> torch.Tensor:
    """The loss of ``obj``'s docstring example (run_docstring_example with torch seeded 0),
    asserted to be a finite scalar."""
    torch.manual_seed(0)
    out = run_docstring_example(obj)
    assert out.shape == () and torch.isfinite(out), f"{obj.__qualname__} example gave {out}"
    return out
