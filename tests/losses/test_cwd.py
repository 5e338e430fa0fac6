import pytest
import torch

import kdfast
from kdfast.functional import cwd_loss
from kdfast.reference.cwd import cwd_loss as reference_cwd
from tests.helpers import assert_rel_close, randn


def value_and_grads(backend, student, teacher, grad_output, **options):
    s = student.detach().requires_grad_(True)
    t = teacher.detach().requires_grad_(True)
    out = cwd_loss(s, t, reduction="none", backend=backend, **options)
    out.backward(grad_output)
    return out, s.grad, t.grad


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 19, 17, 33), (3, 1, 1, 1)])
def test_native_matches_reference(shape, dtype, tol):
    student, teacher = randn(*shape, seed=0).to(dtype) * 3, randn(*shape, seed=1).to(dtype) * 3
    grad_output = randn(shape[0], seed=2).to(dtype)
    options = {"temperature": 2.0, "loss_weight": 3.0}
    got = value_and_grads("native", student, teacher, grad_output, **options)
    want = value_and_grads("reference", student, teacher, grad_output, **options)
    for a, b, what in zip(got, want, ("loss", "d student", "d teacher"), strict=True):
        assert a.dtype == b.dtype
        assert_rel_close(a, b, tol, what)


def test_function_is_the_reference():
    s, t = randn(2, 4, 3, 5, seed=3), randn(2, 4, 3, 5, seed=4)
    torch.testing.assert_close(cwd_loss(s, t, temperature=4.0, reduction="none"),
                               reference_cwd(s, t, 4.0))
    torch.testing.assert_close(cwd_loss(s, t, loss_weight=2.0), 2 * reference_cwd(s, t).mean())


def test_channels_last_and_half_precision():
    s, t = randn(2, 5, 6, 7, seed=5).float(), randn(2, 5, 6, 7, seed=6).float()
    expected = cwd_loss(s, t)
    channels_last = s.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cwd_loss(channels_last, t), expected)
    half = cwd_loss(s.half(), t.half())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, cwd_loss(s.half().float(), t.half().float()),
                               rtol=1e-5, atol=1e-6)


def test_segmentation_sized_rows_on_native():
    # Rows of H·W = 64·128 (many blocks of the online softmax), 19 classes.
    s, t = randn(1, 19, 64, 128, seed=7).float(), randn(1, 19, 64, 128, seed=8).float()
    got = value_and_grads("native", s, t, torch.ones(1), temperature=4.0)
    want = value_and_grads("reference", s.double(), t.double(), torch.ones(1, dtype=torch.float64),
                           temperature=4.0)
    for a, b in zip(got, want, strict=True):
        assert_rel_close(a, b, 1e-5)


def test_module_trains_a_student_towards_the_teacher():
    torch.manual_seed(0)
    student = torch.nn.Conv2d(3, 4, 1)
    x, teacher = torch.randn(2, 3, 6, 6), torch.randn(2, 4, 6, 6)
    criterion = kdfast.CWDLoss(temperature=2.0)
    optimiser = torch.optim.SGD(student.parameters(), lr=0.5)
    first = criterion(student(x), teacher).item()
    for _ in range(20):
        optimiser.zero_grad()
        criterion(student(x), teacher).backward()
        optimiser.step()
    assert criterion(student(x), teacher).item() < first


def test_native_forward_and_backward_hold_one_gradient():
    # The memory target for segmentation maps: above the inputs, forward + backward on the
    # native CPU core allocate one gradient (plus a few numbers per row); the reference keeps
    # several copies of the map.
    from kdfast.bench.measure import cpu_peak_bytes

    student = randn(2, 19, 32, 64, seed=9).float().requires_grad_(True)
    teacher = randn(2, 19, 32, 64, seed=10).float()
    gradient = student.numel() * student.element_size()

    def step(backend):
        def run():
            cwd_loss(student, teacher, backend=backend).backward()
            student.grad = None
        return run

    assert cpu_peak_bytes(step("native")) <= 1.02 * gradient
    assert cpu_peak_bytes(step("reference")) > 2 * gradient
