"""Random draws that depend only on (seed, stream, global sample index).

A draw for sample i never depends on which rank holds it, how large the per-rank batch is, or
what a rank's RNG did before: the latent of global sample 17 at step 3 is the same on 1 process
with batch 32 as on 2 processes with batch 16. That is what makes "2 processes x b equal
1 process x 2b" hold for the whole iteration, and what lets a resumed run draw what the
uninterrupted one would have drawn.

Each sample gets its own generator, seeded by a 64-bit mix of (seed, stream, index). On a CPU
this costs about 3 microseconds per sample (0.2 ms for a batch of 64 latents of 100 numbers),
and the draws are copied to the device once per batch.
"""
from __future__ import annotations

from typing import Sequence

import torch

MASK = (1 << 64) - 1

# streams: one per kind of draw, so that adding a draw never changes another one's numbers
Z, FAKE_LABELS = 1, 2
# StyleGAN2: one seed per sample, from which its style mixing, noise inputs and path-length draws derive
STYLEGAN2 = 3
# augmentation (gan_dist/augment): each D call's per-sample parameters, keyed also by step and call
AUGMENT = 4


def mix(*values: int) -> int:
    """splitmix64 over the values: a well-spread 63-bit seed for torch.Generator.manual_seed."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & MASK)) & MASK
        h = (h + 0x9E3779B97F4A7C15) & MASK
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & MASK
        h ^= h >> 31
    return h & ((1 << 63) - 1)


def randn_by_index(seed: int, stream: int, indices: Sequence[int], shape: Sequence[int],
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """(len(indices), *shape) standard normal draws, row k a function of (seed, stream, indices[k])."""
    out = torch.empty(len(indices), *shape)
    gen = torch.Generator()
    for k, i in enumerate(indices):
        gen.manual_seed(mix(seed, stream, i))
        torch.randn(tuple(shape), generator=gen, out=out[k])
    return out.to(device, non_blocking=True)


def randint_by_index(seed: int, stream: int, indices: Sequence[int], high: int,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """(len(indices),) integers in [0, high), entry k a function of (seed, stream, indices[k])."""
    out = torch.empty(len(indices), dtype=torch.long)
    gen = torch.Generator()
    for k, i in enumerate(indices):
        gen.manual_seed(mix(seed, stream, i))
        out[k] = torch.randint(high, (1,), generator=gen)[0]
    return out.to(device, non_blocking=True)
