"""One training iteration of the alternating GAN loop (Goodfellow et al. 2014; the DCGAN example).

    (1) Update D: maximise log D(x) + log(1 - D(G(z)))    -- `train.d_steps` times
    (2) Update G: maximise log D(G(z))   (or minimise log(1 - D(G(z))))

The strategy object decides how gradients travel between ranks; this file only says when a
model is trained and when an update ends. Each model's gradients are reduced once per update
(on the last micro-batch), and the G phase computes no gradients for D.
"""
from __future__ import annotations

from typing import Sequence

import torch

from gan_dist.losses import d_loss, g_loss
from gan_dist.parallel.base import Strategy

Batch = tuple[torch.Tensor, torch.Tensor]  # (real images, latent z)


def train_step(strategy: Strategy, batches: Sequence[Sequence[Batch]],
               loss_kind: str = "nonsaturating") -> dict[str, torch.Tensor]:
    """One G update preceded by len(batches) D updates, each over len(batches[0]) micro-batches.

    The G forward of the last D update is reused by the G update (one G forward per
    iteration, as in the DCGAN example). With gradient accumulation the fakes are generated
    again in the G phase instead: keeping every micro-batch's graph alive would cost what
    accumulation exists to save. Returns detached scalar tensors; nothing here syncs the host.
    """
    G, D = strategy.G, strategy.D
    n_micro = len(batches[0])
    reuse_fake = n_micro == 1
    stats = {k: torch.zeros((), device=strategy.device)
             for k in ("loss_D", "loss_G", "D_x", "D_G_z1", "D_G_z2")}
    fake = None

    # (1) Update D network
    for d_step, micro_batches in enumerate(batches):
        last_d = d_step == len(batches) - 1
        for i, (real, z) in enumerate(micro_batches):
            with strategy.phase("D", sync=i == n_micro - 1):
                with strategy.autocast():
                    with torch.set_grad_enabled(last_d and reuse_fake):
                        fake = G(z)
                    real_logits = D(real)
                    fake_logits = D(fake.detach())
                loss = d_loss(real_logits, fake_logits)
                strategy.backward(loss / n_micro, "D")
            if last_d:
                stats["loss_D"] += loss.detach() / n_micro
                stats["D_x"] += torch.sigmoid(real_logits.detach().float()).mean() / n_micro
                stats["D_G_z1"] += torch.sigmoid(fake_logits.detach().float()).mean() / n_micro
        strategy.step("D")

    # (2) Update G network
    for i, (real, z) in enumerate(batches[-1]):
        with strategy.phase("G", sync=i == n_micro - 1):
            with strategy.autocast():
                if not reuse_fake:
                    fake = G(z)
                fake_logits = D(fake)
            loss = g_loss(fake_logits, loss_kind)
            strategy.backward(loss / n_micro, "G")
        stats["loss_G"] += loss.detach() / n_micro
        stats["D_G_z2"] += torch.sigmoid(fake_logits.detach().float()).mean() / n_micro
    strategy.step("G")
    return stats
