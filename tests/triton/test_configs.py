"""Every autotuning configuration the GPU may pick, each pinned in turn.

On a GPU the autotuner picks one of each kernel's tuned configurations (bigger blocks, more
partial tiles than the interpreter's fixed one); here each is pinned in turn on shapes that
leave ragged tiles, and the core's values and gradients must still match the reference (run
in float64): in float64 under the interpreter, in float32 with IEEE dots on a GPU, where the
pinned configuration is compiled for real (the first GPU run must check every one of them:
the autotuner alone only runs the one it finds fastest). SP also runs its split-K path
(several D-slices per Gram, the GPU's layout; three under the interpreter).
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

    def at(precise, monkeypatch):
        rand = precise.randn
        check_parity(triton_attention_map, attention_map,
                     [rand(2, 37, 9, 13).to(memory_format=torch.channels_last)], precise.tol,
                     p=3.0)

    def sp(precise, monkeypatch):
        rand = precise.randn
        check_parity(triton_similarity_loss, similarity_loss,
                     [rand(70, 3, 5, 3), rand(70, 2, 7, 1)], precise.tol)

    def fsp(precise, monkeypatch):
        rand = precise.randn
        sa, sb, ta, tb = rand(2, 37, 5, 9), rand(2, 70, 5, 9), rand(2, 37, 3, 4), rand(2, 70, 3, 4)
        check_parity(triton_fsp_pair_loss, fsp_pair_loss, [sa, sb, ta, tb], precise.tol)

    def nst(precise, monkeypatch, recompute=True):  # rbf, both backward paths
        rand = precise.randn
        monkeypatch.setattr(mmd_ops, "MMD_RECOMPUTE_MAX_HW", 1 << 30 if recompute else 0)
        check_parity(mmd_ops.triton_channel_mmd, channel_mmd,
                     [rand(2, 37, 5, 9), rand(2, 70, 5, 9)], precise.tol, kernel="rbf",
                     sigma2=(0.5, 3.0), unbiased=True)

    def nst_saved(precise, monkeypatch):  # the MMD backward through rows_gemm
        nst(precise, monkeypatch, recompute=False)

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
def test_tuned_configuration_matches_reference(precise, monkeypatch, name, index):
    from kdfast.triton import gram
    from kdfast.triton._common import as_configs
    kernel, tuned, check = next((k, t, c) for n, k, t, c in _kernels() if n == name)
    monkeypatch.setattr(kernel, "configs", as_configs([tuned[index]]))  # one: no autotuning
    monkeypatch.setattr(gram, "SP_SPLITS_CPU", 3)
    check(precise, monkeypatch)
