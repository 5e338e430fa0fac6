"""KD with conditional adversarial networks (Xu, Hsu & Huang, 2018, "Training shallow and thin
networks for acceleration via knowledge distillation with conditional adversarial networks").

A discriminator D(z, y) scores logits z conditioned on the label y: teacher logits are "real",
student logits "fake". Per-sample losses, shape (B,):

* LSGAN (Mao et al., 2017, a=0, b=c=1): D minimises 1/2 (D(z_t,y) - 1)^2 + 1/2 D(z_s,y)^2,
  the student minimises 1/2 (D(z_s,y) - 1)^2.
* BCE (the original GAN, non-saturating generator): D minimises
  -log sigmoid(D(z_t,y)) - log(1 - sigmoid(D(z_s,y))), the student -log sigmoid(D(z_s,y)).
* L1 logit matching: mean over classes of |z_s - z_t|.
"""

import torch
import torch.nn.functional as F

GAN_KINDS = ("lsgan", "bce")


def condition(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The discriminator's input: logits concatenated with the one-hot label, (B, 2C)."""
    one_hot = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    return torch.cat([logits, one_hot], dim=1)


def discriminator_terms(real_scores: torch.Tensor, fake_scores: torch.Tensor,
                        kind: str = "lsgan") -> torch.Tensor:
    """Per-sample discriminator loss from its raw scores on real (teacher) and fake logits."""
    if kind == "lsgan":
        return 0.5 * (real_scores - 1).pow(2) + 0.5 * fake_scores.pow(2)
    return F.softplus(-real_scores) + F.softplus(fake_scores)


def generator_term(fake_scores: torch.Tensor, kind: str = "lsgan") -> torch.Tensor:
    """Per-sample adversarial loss of the student from D's raw scores on its logits."""
    if kind == "lsgan":
        return 0.5 * (fake_scores - 1).pow(2)
    return F.softplus(-fake_scores)


def l1_logit_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over classes of |z_s - z_t| per sample."""
    return (student_logits - teacher_logits).abs().mean(dim=1)


def discriminator_loss(discriminator, student_logits: torch.Tensor,
                       teacher_logits: torch.Tensor, labels: torch.Tensor,
                       kind: str = "lsgan") -> torch.Tensor:
    """Per-sample D loss; both logits detached (the D step trains D only)."""
    real = discriminator(teacher_logits.detach(), labels).reshape(-1)
    fake = discriminator(student_logits.detach(), labels).reshape(-1)
    return discriminator_terms(real, fake, kind)


def adversarial_student_loss(discriminator, student_logits: torch.Tensor,
                             teacher_logits: torch.Tensor, labels: torch.Tensor,
                             kind: str = "lsgan", l1_weight: float = 1.0) -> torch.Tensor:
    """Per-sample student loss: generator term + l1_weight * L1(z_s, z_t), teacher detached."""
    fake = discriminator(student_logits, labels).reshape(-1)
    l1 = l1_logit_loss(student_logits, teacher_logits.detach())
    return generator_term(fake, kind) + l1_weight * l1
