"""PLACEHOLDER: gradient_attention — to be implemented (issue 2)."""

def gradient_at_loss(*args, **kwargs):
    raise NotImplementedError


class GradientATLoss:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError
