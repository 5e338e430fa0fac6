"""pytest-benchmark: the batch-Gram cores, SP (B×B similarity) and FSP (per-sample C_a×C_b),
every provider, fwd/bwd/full."""

CORES = ("sp", "fsp")


def test_gram(benchmark, case):
    case.run(benchmark)
