"""pytest-benchmark: the student's lm_head fused with forward-KL distillation against given
teacher logits (labels with ignored tokens), every provider, fwd/bwd/full."""

CORES = ("fused-linear-kd",)


def test_fused_linear_kd(benchmark, case):
    case.run(benchmark)
