"""PLACEHOLDER: ab — to be implemented (issue 2)."""

def ab_loss(*args, **kwargs):
    raise NotImplementedError


class ABLoss:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError
