import pytest

from kdfast.bench.shapes import (
    SUITES,
    EmbeddingShape,
    FeatureShape,
    LogitShape,
    parse_shape,
    shape_dict,
    shape_from_dict,
)


@pytest.mark.parametrize("text, kind, expected", [
    ("64x128x32x32", "features", FeatureShape(64, 128, 128, 32, 32)),
    ("8x64/256x7x9", "features", FeatureShape(8, 64, 256, 7, 9)),
    ("64x100", "logits", LogitShape(64, 100)),
    ("64x100", "embeddings", EmbeddingShape(64, 100, 100)),
    ("64x128/512", "embeddings", EmbeddingShape(64, 128, 512)),
    ("64x128/512", "logits", None),
    ("64x128x32x32", "logits", None),
    ("64x100", "features", None),
])
def test_parse_shape(text, kind, expected):
    assert parse_shape(text, kind) == expected


@pytest.mark.parametrize("text", ["64x", "ax3", "1x2x3", "2/3x4x5x6", "1x2x3/4x5", ""])
def test_parse_shape_rejects_what_is_no_shape(text):
    with pytest.raises(ValueError, match="--shape"):
        parse_shape(text, "features")


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_every_suite_has_each_kind_and_sweeps_to_plot(suite):
    for kind in ("features", "logits", "embeddings"):
        shapes = SUITES[suite].shapes(kind)
        assert shapes and all(s.kind == kind for s in shapes)
        assert len(set(shapes)) == len(shapes)
        assert all(shape_from_dict(shape_dict(s)) == s for s in shapes)
    features = SUITES[suite].features
    assert len({s.height for s in features}) >= 2
    assert len({s.s_channels for s in features}) >= 2


def test_cifar_and_large_suites_match_the_design():
    cifar = SUITES["cifar"].features
    assert {s.height for s in cifar} == {8, 16, 32} and {s.batch for s in cifar} == {64}
    assert {s.s_channels for s in cifar} == {64, 128, 256}
    large = {s.height for s in SUITES["large"].features}
    assert min(large) == 8 and max(large) == 256
