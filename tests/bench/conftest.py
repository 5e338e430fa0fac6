"""Fixtures of the benchmark-harness tests: a CPU Settings with few repeats."""

import pytest
import torch

from kdfast.bench.runner import Settings, environment


@pytest.fixture
def settings():
    return Settings(torch.device("cpu"), torch.float32, modes=("fwd", "full"), warmup=1,
                    repeats=2, time_limit=30.0)


@pytest.fixture(scope="session")
def env():
    return environment(torch.device("cpu"))
