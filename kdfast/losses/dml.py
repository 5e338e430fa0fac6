"""PLACEHOLDER: dml — to be implemented (issue 2)."""

def dml_loss(*args, **kwargs):
    raise NotImplementedError


class DMLLoss:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError
