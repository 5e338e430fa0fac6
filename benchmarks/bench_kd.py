"""pytest-benchmark: logit KD (Hinton, T=4), every provider, fwd/bwd/full."""

CORES = ("kd",)


def test_kd(benchmark, case):
    case.run(benchmark)
