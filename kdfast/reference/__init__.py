"""The oracle: every loss in plain, paper-faithful PyTorch (memory-sane algebra, no tricks).

Functions here assume validated inputs (the public API in :mod:`kdfast.functional` checks
them) and return per-sample losses where the loss has a per-sample form, so the caller
applies ``reduction``.
"""
