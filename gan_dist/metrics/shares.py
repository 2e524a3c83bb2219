"""Splitting N samples across ranks and bringing per-sample results back to rank 0.

Sample i is the same image whatever the world size: its latent comes from a counter-based
stream (block i // LATENT_BLOCK of the seed), and rank r takes a contiguous range of indices.
Gathered in rank order, the rows are in index order: exactly N, none twice, none missing.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from gan_dist import distributed as gdist

LATENT_BLOCK = 1024


def share(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of the indices rank `rank` handles; the first n % world_size ranks get one more."""
    if n < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad split: n={n}, rank={rank}, world_size={world_size}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def share_counts(n: int, world_size: int) -> list[int]:
    return [e - s for s, e in (share(n, r, world_size) for r in range(world_size))]


def _block_seed(seed: int, block: int) -> int:
    return int(np.random.SeedSequence([seed, block]).generate_state(1, dtype=np.uint64)[0] >> 1)


def latents(start: int, end: int, nz: int, seed: int) -> torch.Tensor:
    """Latents of samples [start, end) (float32, CPU), independent of how samples are split."""
    if end <= start:
        return torch.empty(0, nz)
    out = []
    for block in range(start // LATENT_BLOCK, (end - 1) // LATENT_BLOCK + 1):
        g = torch.Generator().manual_seed(_block_seed(seed, block))
        z = torch.randn(LATENT_BLOCK, nz, generator=g)
        lo = max(start, block * LATENT_BLOCK) - block * LATENT_BLOCK
        hi = min(end, (block + 1) * LATENT_BLOCK) - block * LATENT_BLOCK
        out.append(z[lo:hi])
    return torch.cat(out)


def _comm_device(t: torch.Tensor) -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(local: torch.Tensor, counts: list[int], dst: int = 0) -> Optional[torch.Tensor]:
    """Concatenate every rank's rows (rank r holds counts[r] of them) on rank `dst`, in rank
    order; None on the other ranks. Collective; the ranks may hold different numbers of rows.

    Rows are padded to the largest count for the collective and the padding is dropped.
    """
    if gdist.world_size() == 1:
        return local
    rank, world = gdist.rank(), gdist.world_size()
    if len(counts) != world or local.shape[0] != counts[rank]:
        raise ValueError(f"rank {rank} holds {local.shape[0]} rows, the split says {counts}")
    width = max(max(counts), 1)
    device = _comm_device(local)
    padded = torch.zeros((width, *local.shape[1:]), dtype=local.dtype, device=device)
    padded[:local.shape[0]] = local.to(device)
    bucket = [torch.empty_like(padded) for _ in range(world)] if rank == dst else None
    dist.gather(padded, bucket, dst=dst)
    if rank != dst:
        return None
    return torch.cat([b[:c] for b, c in zip(bucket, counts)]).to(local.device)


def all_counts(count: int) -> list[int]:
    """Every rank's `count`, on every rank (for gathers whose sizes are not known in advance)."""
    if not gdist.is_distributed():
        return [count]
    t = torch.tensor([count], dtype=torch.int64, device=_comm_device(torch.empty(0)))
    out = [torch.zeros_like(t) for _ in range(gdist.world_size())]
    dist.all_gather(out, t)
    return [int(x.item()) for x in out]
