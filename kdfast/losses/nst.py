"""PLACEHOLDER: nst — to be implemented (issue 2)."""

def nst_loss(*args, **kwargs):
    raise NotImplementedError


class NSTLoss:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError
