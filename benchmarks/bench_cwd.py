"""pytest-benchmark: channel-wise distillation (CWD, τ = 1) on segmentation logit maps, every
provider, fwd/bwd/full."""

CORES = ("cwd",)


def test_cwd(benchmark, case):
    case.run(benchmark)
