"""Adversarial losses on D's logits, each with the statistics that mean something for it.

    nonsaturating  D: -log s(D(x)) - log(1 - s(D(G(z))))      G: -log s(D(G(z)))
    minimax        D: as above                                G: log(1 - s(D(G(z))))
    hinge          D: relu(1 - D(x)) + relu(1 + D(G(z)))       G: -D(G(z))
    rpgan          D: f(D(G(z)) - D(x))                        G: f(D(x) - D(G(z)))

with s the logistic sigmoid and f(t) = softplus(t) = -log s(-t) (the relativistic pairing of
R3GAN, Huang et al. 2024: each real is paired with the fake at the same position of the batch).
All in fp32 whatever the autocast dtype; the logistic terms use BCE-with-logits, which stays
finite where sigmoid + log does not. Statistic names are the TensorBoard keys; "before/after
the D update" tells the fake logits of the D phase from those of the G phase, which D sees
after its step.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

Stats = dict[str, torch.Tensor]


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


class Loss:
    name = ""
    g_needs_real = False  # whether the G loss reads D(x) too (relativistic losses)

    def d_loss(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        raise NotImplementedError

    def g_loss(self, fake: torch.Tensor, real: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Stats]:
        raise NotImplementedError


class Logistic(Loss):
    """D(x) as a probability: the logistic losses log s(D(x)) and s(D(G(z)))."""

    def __init__(self, saturating: bool) -> None:
        self.saturating = saturating
        self.name = "minimax" if saturating else "nonsaturating"

    def d_loss(self, real, fake):
        real, fake = real.float(), fake.float()
        loss = _bce(real, 1.0) + _bce(fake, 0.0)
        return loss, {"D/real": torch.sigmoid(real.detach()).mean(),
                      "D/fake_before_D_update": torch.sigmoid(fake.detach()).mean()}

    def g_loss(self, fake, real=None):
        fake = fake.float()
        loss = -_bce(fake, 0.0) if self.saturating else _bce(fake, 1.0)
        return loss, {"D/fake_after_D_update": torch.sigmoid(fake.detach()).mean()}


class Hinge(Loss):
    """Hinge loss (Lim & Ye 2017; SAGAN, BigGAN): logits are margins, not probabilities."""

    name = "hinge"

    def d_loss(self, real, fake):
        real, fake = real.float(), fake.float()
        loss = F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
        return loss, {"logits/real": real.detach().mean(), "logits/fake_before_D_update": fake.detach().mean(),
                      # share of samples D still gets wrong by its margin (they carry the gradient)
                      "margin/real_inside": (real.detach() < 1).float().mean(),
                      "margin/fake_inside": (fake.detach() > -1).float().mean()}

    def g_loss(self, fake, real=None):
        fake = fake.float()
        return -fake.mean(), {"logits/fake_after_D_update": fake.detach().mean()}


class RpGAN(Loss):
    """Relativistic pairing GAN loss (Jolicoeur-Martineau 2019; R3GAN)."""

    name = "rpgan"
    g_needs_real = True

    def d_loss(self, real, fake):
        real, fake = real.float(), fake.float()
        rel = real - fake
        return F.softplus(-rel).mean(), {"logits/real": real.detach().mean(),
                                         "logits/fake_before_D_update": fake.detach().mean(),
                                         "D/real_beats_fake": torch.sigmoid(rel.detach()).mean()}

    def g_loss(self, fake, real=None):
        if real is None:
            raise ValueError("the rpgan G loss needs D(x) of the paired real images")
        fake, real = fake.float(), real.float()
        return F.softplus(real - fake).mean(), {"logits/fake_after_D_update": fake.detach().mean()}


LOSSES = {"nonsaturating": lambda: Logistic(saturating=False), "minimax": lambda: Logistic(saturating=True),
          "hinge": Hinge, "rpgan": RpGAN}


def build_loss(name: str) -> Loss:
    if name not in LOSSES:
        raise ValueError(f"train.loss={name!r} is not one of: {', '.join(LOSSES)}")
    return LOSSES[name]()
