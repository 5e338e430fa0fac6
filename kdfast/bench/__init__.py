"""``python -m kdfast.bench``: speed, peak memory and fraction-of-floor of every core against
eager PyTorch, ``torch.compile`` and the naive formulations (docs/design.md, "Benchmarks").

Modules: :mod:`~kdfast.bench.shapes` (suites, shared with ``benchmarks/``),
:mod:`~kdfast.bench.cores` (one declarative entry per core), :mod:`~kdfast.bench.providers`
(reference, compile, naive, registered backends), :mod:`~kdfast.bench.measure` (timing and
memory), :mod:`~kdfast.bench.floors` and :mod:`~kdfast.bench.ceilings` (the floor),
:mod:`~kdfast.bench.runner` (rows), :mod:`~kdfast.bench.report` (table, JSON, plots),
:mod:`~kdfast.bench.cli`; the training-step benchmark (``--steps``):
:mod:`~kdfast.bench.models` (teacher/student pairs) and :mod:`~kdfast.bench.steps`.
"""
