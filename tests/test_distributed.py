"""gather=True for SP and RKD: two gloo processes on the CPU against one process on the
concatenated batch (values, and gradients = world_size x the full-batch gradient slice, which
DDP's gradient averaging turns into the full-batch gradient)."""

import os
import tempfile
import warnings
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed import _functional_collectives

from kdfast.functional import rkd_loss, sp_loss

WORLD = 2
SIZES = (3, 2)  # uneven batches: the last batch of an epoch


def full_batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(sum(SIZES), 3, 4, 4, dtype=torch.float64, generator=generator)
    teacher = torch.randn(sum(SIZES), 5, 2, 2, dtype=torch.float64, generator=generator)
    return student, teacher


def _worker(rank: int, init_file: str, results: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        student, teacher = full_batch()
        start = sum(SIZES[:rank])
        local = slice(start, start + SIZES[rank])

        def run(suffix=""):
            for name, loss in (("sp", sp_loss), ("rkd", rkd_loss)):
                s = student[local].clone().requires_grad_(True)
                value = loss(s, teacher[local], gather=True)
                (grad,) = torch.autograd.grad(value, s)
                out[name + suffix] = (value.detach(), grad)

        out = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
        out["future_warnings"] = [str(w.message) for w in caught
                                  if issubclass(w.category, FutureWarning)]
        # The fallback of a torch without all_gather_single_autograd (2.4).
        with mock.patch.object(_functional_collectives, "all_gather_single_autograd", None,
                               create=True), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            run("-fallback")
        torch.save(out, os.path.join(results, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while the other is still in a collective
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fallback", ["", "-fallback"])
@pytest.mark.parametrize("name,loss", [("sp", sp_loss), ("rkd", rkd_loss)])
def test_gather_equals_single_process_on_the_global_batch(name, loss, fallback,
                                                          gathered_results):
    student, teacher = full_batch()
    s = student.clone().requires_grad_(True)
    expected = loss(s, teacher)
    (expected_grad,) = torch.autograd.grad(expected, s)
    for rank in range(WORLD):
        value, grad = gathered_results[rank][name + fallback]
        torch.testing.assert_close(value, expected.detach())
        start = sum(SIZES[:rank])
        torch.testing.assert_close(grad, WORLD * expected_grad[start:start + SIZES[rank]])


def test_gather_raises_no_deprecation_warning(gathered_results):
    for rank in range(WORLD):
        assert gathered_results[rank]["future_warnings"] == []


@pytest.fixture(scope="module")
def gathered_results():
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(init_file, tmp), nprocs=WORLD, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]


def test_gather_without_process_group_is_a_no_op():
    student, teacher = full_batch()
    torch.testing.assert_close(sp_loss(student, teacher, gather=True), sp_loss(student, teacher))


def test_gather_must_be_a_flag():
    student, teacher = full_batch()
    with pytest.raises(TypeError, match="gather must be True or False"):
        sp_loss(student, teacher, gather="yes")
