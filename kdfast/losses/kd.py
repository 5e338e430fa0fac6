"""PLACEHOLDER: kd — to be implemented (issue 2)."""

def kd_loss(*args, **kwargs):
    raise NotImplementedError


class KDLoss:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError
