"""pytest-benchmark: decoupled KD (mdistiller defaults, T=4), every provider, fwd/bwd/full."""

CORES = ("dkd",)


def test_dkd(benchmark, case):
    case.run(benchmark)
