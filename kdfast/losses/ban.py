"""PLACEHOLDER: ban — to be implemented (issue 2)."""

class BornAgainEnsemble:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError


def ban_generation_loss(*args, **kwargs):
    raise NotImplementedError
