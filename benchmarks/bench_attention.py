"""pytest-benchmark: the attention p-norm map (AT), every provider, fwd/bwd/full."""

CORES = ("at",)


def test_attention(benchmark, case):
    case.run(benchmark)
