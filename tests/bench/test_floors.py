import pytest

from kdfast.bench import floors
from kdfast.bench.cores import CORES
from kdfast.bench.shapes import SUITES, FeatureShape, LmHeadShape, LogitShape


def test_attention_floor_is_the_feature_bytes():
    shape = FeatureShape(2, 3, 5, 4, 6)
    floor = floors.attention(shape, 4)
    assert floor["fwd"] == floors.Floor(2 * (3 + 5) * 24 * 4, 0)
    assert floor["bwd"] == floors.Floor(2 * 2 * 3 * 24 * 4, 0)
    assert floor["full"] == floor["fwd"] + floor["bwd"]


def test_mmd_floor_uses_the_symmetric_gram_and_poly_the_smaller_form():
    wide = FeatureShape(1, 64, 64, 32, 32)  # D = 1024 > m + n: the C x C Grams
    assert floors.mmd_gram(wide, 4)["fwd"].flops == 128 ** 2 * 1024
    assert floors.mmd_gram(wide, 4)["bwd"].flops == 2 * 64 * 128 * 1024
    assert floors.mmd_poly(wide, 4)["fwd"].flops == floors.mmd_gram(wide, 4)["fwd"].flops
    deep = FeatureShape(1, 512, 512, 4, 4)  # D = 16 < m + n: the D x D Grams
    assert floors.mmd_poly(deep, 4)["fwd"].flops == 1024 * 16 * 16
    assert floors.mmd_linear(deep, 4)["fwd"].flops == 0


def test_floor_seconds_is_the_slower_of_bytes_and_flops():
    floor = floors.Floor(bytes=10.0, flops=100.0)
    assert floor.seconds(bytes_per_s=1.0, flops_per_s=1000.0) == 10.0
    assert floor.seconds(bytes_per_s=100.0, flops_per_s=10.0) == 10.0


@pytest.mark.parametrize("name", sorted(CORES))
def test_every_core_has_positive_floors_for_every_mode(name):
    core = CORES[name]
    for shape in SUITES["quick"].shapes(core.kind):
        per_mode = core.floor(shape, 4)
        assert set(per_mode) == {"fwd", "bwd", "full"}
        assert all(f.bytes > 0 and f.flops >= 0 for f in per_mode.values())


def test_kd_floor_reads_both_logits():
    assert floors.logit_kd(LogitShape(4, 10), 2)["fwd"].bytes == 2 * 40 * 2


def test_fused_linear_floor_is_four_gemms_for_forward_and_backward():
    floor = floors.fused_linear(LmHeadShape(4, 3, 10), 4)
    gemm = 2 * 4 * 3 * 10
    assert floor["fwd"].flops == 2 * gemm and floor["bwd"].flops == 2 * gemm
    assert floor["full"].flops == 4 * gemm
    assert floor["fwd"].bytes == 2 * (4 * 3 + 10 * 3) * 4
