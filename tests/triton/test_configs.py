"""Every autotuning configuration the GPU may pick, run under the interpreter.

On a GPU the autotuner picks one of each kernel's tuned configurations (bigger blocks, more
partial tiles than the interpreter's fixed one); here each is pinned in turn on shapes that
leave ragged tiles, and the core's values and gradients must still match the reference in
float64. SP also runs its split-K path (several D-slices per Gram, the GPU's layout).
"""

import pytest
import torch

from kdfast.reference.attention import attention_map
from kdfast.reference.fsp import fsp_pair_loss
from kdfast.reference.nst import channel_mmd
from kdfast.reference.sp import similarity_loss
from tests.triton.parity import check_parity

pytestmark = pytest.mark.triton_interpret


def _kernels():
    """(name, autotuned kernel, its tuned dicts, a parity check that runs it)."""
    from kdfast.ops import mmd as mmd_ops
    from kdfast.ops.attention import triton_attention_map
    from kdfast.ops.gram import triton_fsp_pair_loss, triton_similarity_loss
    from kdfast.triton import _gemm, attention, gram, mmd

    def at(rand, monkeypatch):
        check_parity(triton_attention_map, attention_map,
                     [rand(2, 37, 9, 13).to(memory_format=torch.channels_last)], 1e-12, p=3.0)

    def sp(rand, monkeypatch):
        check_parity(triton_similarity_loss, similarity_loss,
                     [rand(70, 3, 5, 3), rand(70, 2, 7, 1)], 1e-12)

    def fsp(rand, monkeypatch):
        sa, sb, ta, tb = rand(2, 37, 5, 9), rand(2, 70, 5, 9), rand(2, 37, 3, 4), rand(2, 70, 3, 4)
        check_parity(triton_fsp_pair_loss, fsp_pair_loss, [sa, sb, ta, tb], 1e-12)

    def nst(rand, monkeypatch, recompute=True):  # rbf, both backward paths
        monkeypatch.setattr(mmd_ops, "MMD_RECOMPUTE_MAX_HW", 1 << 30 if recompute else 0)
        check_parity(mmd_ops.triton_channel_mmd, channel_mmd,
                     [rand(2, 37, 5, 9), rand(2, 70, 5, 9)], 1e-12, kernel="rbf",
                     sigma2=(0.5, 3.0), unbiased=True)

    def nst_saved(rand, monkeypatch):  # the MMD backward through rows_gemm
        nst(rand, monkeypatch, recompute=False)

    return [("attention forward", attention._at_forward_kernel, attention._TUNED, at),
            ("attention backward", attention._at_backward_kernel, attention._TUNED, at),
            ("sp gram", gram._sp_gram_kernel, gram._GRAM_TUNED, sp),
            ("fsp", gram._fsp_kernel, gram._FSP_TUNED, fsp),
            ("rows gemm", _gemm._rows_gemm_kernel, _gemm._GEMM_TUNED, nst_saved),
            ("mmd block", mmd._mmd_block_kernel, mmd._MMD_TUNED, nst),
            ("mmd recompute backward", mmd._mmd_recompute_backward_kernel, mmd._RECOMPUTE_TUNED,
             nst)]


CASES = [(name, index) for name, count in [
    ("attention forward", 6), ("attention backward", 6), ("sp gram", 5), ("fsp", 5),
    ("rows gemm", 5), ("mmd block", 5), ("mmd recompute backward", 4)]
    for index in range(count)]


def test_the_case_table_covers_every_tuned_configuration(device):
    counts = {name: len(tuned) for name, _, tuned, _ in _kernels()}
    assert sorted(CASES) == sorted((name, i) for name, n in counts.items() for i in range(n))


@pytest.mark.parametrize(("name", "index"), CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_tuned_configuration_matches_reference(device, monkeypatch, name, index):
    if device != "cpu":
        pytest.skip("on a GPU the autotuner itself runs every configuration")
    from kdfast.triton import gram
    from kdfast.triton._common import as_configs
    kernel, tuned, check = next((k, t, c) for n, k, t, c in _kernels() if n == name)
    monkeypatch.setattr(kernel, "configs", as_configs([tuned[index]]))
    monkeypatch.setattr(gram, "SP_SPLITS_CPU", 3)
    check(lambda *shape: torch.randn(*shape, dtype=torch.float64), monkeypatch)
