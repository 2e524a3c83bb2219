"""Per-sample random numbers of one augmented D call, as a function of (seed, step, call, index).

Sample i of a call gets its own generator seeded by gan_dist.rng.mix(seed, AUGMENT, step,
call, i), so the augmentation of a sample never depends on the rank that holds it or on the
per-rank batch size: 2 processes with batch b augment exactly what 1 process with batch 2b
augments, and a resumed run augments what the uninterrupted one would have. The numbers are
drawn on the CPU and copied to the device once per call.
"""
from __future__ import annotations

from typing import Sequence

import torch

from gan_dist import rng


def draws(seed: int, step: int, call: int, indices: Sequence[int], n_uniform: int, n_normal: int,
          device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(uniform (N, n_uniform) in [0, 1), standard normal (N, n_normal)), row k of sample indices[k]."""
    u = torch.empty(len(indices), n_uniform)
    n = torch.empty(len(indices), n_normal)
    gen = torch.Generator()
    for k, i in enumerate(indices):
        gen.manual_seed(rng.mix(seed, rng.AUGMENT, step, call, i))
        torch.rand(n_uniform, generator=gen, out=u[k])
        torch.randn(n_normal, generator=gen, out=n[k])
    return u.to(device, non_blocking=True), n.to(device, non_blocking=True)


__all__ = ["draws"]
