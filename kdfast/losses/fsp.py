"""PLACEHOLDER: fsp — to be implemented (issue 2)."""

def fsp_loss(*args, **kwargs):
    raise NotImplementedError


class FSPLoss:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError
