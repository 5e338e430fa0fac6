"""pytest-benchmark: channel MMD (NST) with the rbf, poly and linear kernels, every provider
(naive B·C·C·HW included), fwd/bwd/full."""

CORES = ("nst-rbf", "nst-poly", "nst-linear")


def test_mmd(benchmark, case):
    case.run(benchmark)
