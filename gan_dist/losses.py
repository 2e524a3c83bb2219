"""GAN losses on logits (Goodfellow et al. 2014), as used in the DCGAN example.

D maximises log D(x) + log(1 - D(G(z))); G either minimises log(1 - D(G(z))) (the original
"minimax" form, which saturates early in training) or maximises log D(G(z)) ("nonsaturating",
the usual choice). All are computed in fp32 with BCE-with-logits, which stays finite under
autocast where sigmoid + BCELoss does not.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """-[log D(x) + log(1 - D(G(z)))], averaged over each half of the batch."""
    real_logits, fake_logits = real_logits.float(), fake_logits.float()
    return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def g_loss(fake_logits: torch.Tensor, kind: str = "nonsaturating") -> torch.Tensor:
    fake_logits = fake_logits.float()
    if kind == "nonsaturating":  # -log D(G(z))
        return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
    if kind == "minimax":  # log(1 - D(G(z))) = -BCE(logit, 0)
        return -F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    raise ValueError(f"train.loss={kind!r} is not one of: nonsaturating, minimax")
