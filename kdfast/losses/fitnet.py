"""PLACEHOLDER: fitnet — to be implemented (issue 2)."""

def fitnet_loss(*args, **kwargs):
    raise NotImplementedError


class FitNetLoss:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError


def make_connector(*args, **kwargs):
    raise NotImplementedError
