"""PLACEHOLDER: sp — to be implemented (issue 2)."""

def sp_loss(*args, **kwargs):
    raise NotImplementedError


class SPLoss:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError
