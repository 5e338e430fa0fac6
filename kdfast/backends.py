"""Which implementation of a fused core runs: availability, policy and the registry.

Every fused core (``"attention_map"``, later ``"gram"``, ``"mmd"`` ...) has a pure-PyTorch
``reference`` implementation and optionally ``native`` (the C++/CUDA extension ``kdfast._C``)
and ``triton`` ones. Each registers itself here with a ``supports`` predicate that says, for
concrete tensors, why it cannot run them (or ``None`` when it can). The public functions call
:func:`choose` *before* ``Function.apply`` so that exactly one autograd Function runs.

Policy (the ``backend=`` argument of every loss, else the ``KDFAST_BACKEND`` environment
variable, else ``"auto"``):

* ``"auto"``: CUDA tensors try ``triton``, then ``native``, then ``reference``; CPU tensors
  try ``native``, then ``reference``; the same inside ``torch.compile`` (the native and
  Triton cores are ``torch.library`` operators that trace through their fake implementations).
* ``"native"`` / ``"triton"`` / ``"reference"``: that implementation. Asked for by argument
  and not able to run, it raises ``ValueError`` saying why; asked for through the environment
  variable, it falls back to ``auto`` with a one-time warning (so a global preference never
  breaks a loss that has no such core).

Under a ``torch.func`` transform (``grad``, ``vmap``, ``jacrev``, ``jvp``, ``hessian`` ...) only
the reference runs: the fused cores are autograd Functions over opaque operators, with no
batching or forward-mode rule, so ``auto`` picks the reference (pure PyTorch, which every
transform handles, to any order) and an explicit ``native`` / ``triton`` raises the
``ValueError`` above. Second derivatives through ``torch.autograd`` need no such switch: the
fused Functions differentiate the reference in a ``create_graph=True`` backward
(:mod:`kdfast.ops._higher_order`).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kdfast._precision import autocast_off

BACKENDS = ("auto", "native", "triton", "reference")
ENV_VAR = "KDFAST_BACKEND"

_AUTO_ORDER = {"cuda": ("triton", "native", "reference"), "cpu": ("native", "reference")}


@dataclass(frozen=True)
class Implementation:
    core: str
    backend: str
    fn: Callable
    # Returns None when the implementation can run these tensors, else the reason it cannot.
    supports: Callable[..., str | None]


_REGISTRY: dict[str, dict[str, Implementation]] = {}
_WARNED: set[str] = set()


def _always(*tensors: torch.Tensor) -> str | None:
    return None


def _without_autocast(fn: Callable) -> Callable:
    """``fn`` run with autocast off for its first tensor's device: cores manage precision
    themselves (fp32 accumulation, see :mod:`kdfast._precision`)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if tensor is None:
            return fn(*args, **kwargs)
        with autocast_off(tensor):
            return fn(*args, **kwargs)
    return run


def register(core: str, backend: str, fn: Callable, supports: Callable | None = None) -> None:
    """Registers ``fn`` as the ``backend`` implementation of ``core`` (run without autocast)."""
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"backend must be one of native, triton, reference; got {backend!r}")
    impl = Implementation(core, backend, _without_autocast(fn), supports or _always)
    _REGISTRY.setdefault(core, {})[backend] = impl


def implementations(core: str) -> dict[str, Implementation]:
    """The registered implementations of ``core`` by backend name (what the benchmark runs)."""
    if core not in _REGISTRY:
        raise KeyError(f"unknown core {core!r}; known: {sorted(_REGISTRY)}")
    return dict(_REGISTRY[core])


def warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _requested(backend: str | None) -> tuple[str, bool]:
    """The backend asked for and whether it was asked for explicitly (by argument)."""
    if backend is not None:
        explicit, name = True, backend
    else:
        explicit, name = False, os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        source = "backend" if explicit else f"the {ENV_VAR} environment variable"
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name, explicit


def functorch_transform_active() -> bool:
    """Whether a ``torch.func`` transform (grad, vmap, jacrev, ...) is running; False on a
    torch without the check (it is private API, present from torch 2.0 on)."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active is not None and active())


_TRANSFORM_REASON = ("a torch.func transform (grad, vmap, jacrev, ...) is active, and the fused "
                     "kernels have no rule for it (the reference runs under every transform)")


def _why_not(impl: Implementation, tensors: tuple[torch.Tensor, ...]) -> str | None:
    """Why ``impl`` cannot run ``tensors`` here, or None when it can."""
    if impl.backend != "reference" and functorch_transform_active():
        return _TRANSFORM_REASON
    return impl.supports(*tensors)


def choose(core: str, backend: str | None, *tensors: torch.Tensor) -> Implementation:
    """The implementation of ``core`` that runs ``tensors`` under the policy above."""
    name, explicit = _requested(backend)
    impls = implementations(core)
    if name != "auto":
        impl = impls.get(name)
        reason = f"no {name} implementation of {core} is built" if impl is None else None
        if impl is not None:
            reason = _why_not(impl, tensors)
        if reason is None:
            return impl
        if explicit:
            raise ValueError(f"backend={name!r} cannot run {core}: {reason}. "
                             f"Use backend='auto' to let kdfast pick one that can.")
        warn_once(f"env:{core}:{name}", f"{ENV_VAR}={name} cannot run {core} ({reason}); "
                                        "falling back to the automatic choice")
    device = tensors[0].device.type if tensors else "cpu"
    for candidate in _AUTO_ORDER.get(device, ("reference",)):
        impl = impls.get(candidate)
        if impl is not None and _why_not(impl, tensors) is None:
            return impl
    return impls["reference"]


@functools.cache
def native_extension():
    """The compiled extension module ``kdfast._C``, or None (with one warning) if not built;
    looked up once (every dispatch asks)."""
    try:
        from kdfast import _C
    except ImportError as error:  # pragma: no cover - depends on the build
        warn_once("native-import", f"kdfast's native extension is not built ({error}); "
                                   "every loss runs on the pure-PyTorch reference. Build it "
                                   "with `pip install --no-build-isolation -e .`.")
        return None
    return _C


NATIVE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def native_supports(*tensors: torch.Tensor) -> str | None:
    """Why the native kernels cannot run ``tensors`` (None when they can).

    They need the built extension, CPU tensors (or CUDA ones when it was built with CUDA)
    and a float32/float64/float16/bfloat16 dtype.
    """
    ext = native_extension()
    if ext is None:
        return "the native extension is not built"
    for tensor in tensors:
        device = tensor.device.type
        if device not in ("cpu", "cuda") or (device == "cuda" and not ext.built_with_cuda()):
            return f"the native extension has no kernels for {device} tensors in this build"
        if tensor.dtype not in NATIVE_DTYPES:
            return f"the native kernels do not support dtype {tensor.dtype}"
    return None


def register_native_fake(op: str, fn: Callable) -> None:
    """Registers ``fn`` as the fake (shape-only) implementation of ``torch.ops.kdfast.<op>``,
    so ``torch.compile`` can trace the native kernels; a no-op when the extension is not built.
    """
    if native_extension() is None:  # importing it defines the operators
        return
    torch.library.register_fake(f"kdfast::{op}", fn)


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def available_backends() -> dict[str, bool]:
    """Which backends can run on this machine: ``{"reference": True, "native": ..., ...}``.

    ``native`` is True when the extension is built; ``native_cuda`` when it was built with CUDA
    kernels; ``triton`` when Triton imports and a CUDA device is present (or the interpreter
    is on via ``TRITON_INTERPRET=1``).
    """
    ext = native_extension()
    cuda = torch.cuda.is_available()
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    return {
        "reference": True,
        "native": ext is not None,
        "native_cuda": bool(ext is not None and ext.built_with_cuda()),
        "triton": triton_importable() and (cuda or interpret),
    }
