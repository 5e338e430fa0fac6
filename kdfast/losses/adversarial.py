"""PLACEHOLDER: adversarial — to be implemented (issue 2)."""

class ConditionalDiscriminator:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError


class AdversarialKD:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError


def discriminator_loss(*args, **kwargs):
    raise NotImplementedError


def adversarial_student_loss(*args, **kwargs):
    raise NotImplementedError
