"""Native attention map: gradcheck, the automatic choice, refused dtypes, torch.compile.
Values and gradients over shapes, layouts, dtypes, degenerate inputs, determinism and random
shapes (CPU and CUDA) are in tests/test_parity.py."""

import pytest
import torch

import kdfast
from kdfast import backends
from kdfast.ops.attention import native_attention_map
from kdfast.reference.attention import attention_map
from tests.helpers import assert_rel_close, randn

pytestmark = pytest.mark.skipif(not kdfast.available_backends()["native"],
                                reason="native extension not built")


def value_and_grad(fn, x, grad_map, p):
    out = fn(x, p)
    (grad,) = torch.autograd.grad(out, x, grad_map)
    return out, grad


def test_native_float64_gradcheck():
    x = randn(2, 3, 4, 5, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: native_attention_map(t, 3.0), (x,))


def test_auto_picks_native_on_cpu():
    assert backends.choose("attention_map", "auto", randn(1, 2, 3, 3)).backend == "native"


def test_native_refuses_integer_dtype():
    reason = backends.native_supports(torch.zeros(1, 2, 3, 3, dtype=torch.int64))
    assert reason is not None and "dtype" in reason


def test_native_traces_under_torch_compile():
    x = randn(2, 3, 4, 5, requires_grad=True)
    grad_map = torch.randn(2, 20, dtype=torch.float64)
    compiled = torch.compile(native_attention_map, fullgraph=True, backend="aot_eager")
    out, grad = value_and_grad(compiled, x, grad_map, 2.0)
    ref, ref_grad = value_and_grad(attention_map, x, grad_map, 2.0)
    assert_rel_close(out, ref, 1e-12, "value")
    assert_rel_close(grad, ref_grad, 1e-12, "gradient")
