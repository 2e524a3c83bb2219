"""The batches the exactness workers train on: one global batch per D step drawn from a seeded
generator on every rank, of which each rank takes its `accum` micro-batches."""
from __future__ import annotations

import torch

from gan_dist.loop import Batch


def rank_batches(gen: torch.Generator, global_batch: int, d_steps: int, accum: int, rank: int,
                 world_size: int, nz: int) -> list[list[Batch]]:
    per_rank = global_batch // (world_size * accum)
    batches = []
    for _ in range(d_steps):
        real = torch.rand(global_batch, 1, 32, 32, generator=gen) * 2 - 1
        z = torch.randn(global_batch, nz, generator=gen)
        micro = []
        for m in range(accum):
            lo = (rank * accum + m) * per_rank
            micro.append(Batch(real[lo:lo + per_rank], z[lo:lo + per_rank]))
        batches.append(micro)
    return batches
