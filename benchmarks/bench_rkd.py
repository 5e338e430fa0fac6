"""pytest-benchmark: relational KD (distance + angle), every provider, fwd/bwd/full."""

CORES = ("rkd",)


def test_rkd(benchmark, case):
    case.run(benchmark)
