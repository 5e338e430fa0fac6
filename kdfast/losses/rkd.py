"""PLACEHOLDER: rkd — to be implemented (issue 2)."""

def rkd_loss(*args, **kwargs):
    raise NotImplementedError


class RKDLoss:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError
