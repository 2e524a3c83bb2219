"""The batches the exactness workers train on: one global batch per D step drawn from a seeded
generator on every rank, of which each rank takes its `accum` micro-batches (with the class
labels of the reals and of the fakes when `num_classes` > 0, drawn after the images and latents
so that unconditional batches stay as they were)."""
from __future__ import annotations

import torch

from gan_dist.loop import Batch


def rank_batches(gen: torch.Generator, global_batch: int, d_steps: int, accum: int, rank: int,
                 world_size: int, nz: int, num_classes: int = 0) -> list[list[Batch]]:
    per_rank = global_batch // (world_size * accum)
    batches = []
    for _ in range(d_steps):
        real = torch.rand(global_batch, 1, 32, 32, generator=gen) * 2 - 1
        z = torch.randn(global_batch, nz, generator=gen)
        real_c = fake_c = None
        if num_classes:
            real_c = torch.randint(num_classes, (global_batch,), generator=gen)
            fake_c = torch.randint(num_classes, (global_batch,), generator=gen)
        micro = []
        for m in range(accum):
            lo = (rank * accum + m) * per_rank
            part = slice(lo, lo + per_rank)
            micro.append(Batch(real[part], z[part], real_c[part] if num_classes else None,
                               fake_c[part] if num_classes else None))
        batches.append(micro)
    return batches
