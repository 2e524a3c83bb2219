"""DistributedDataParallel for G and D, each wrapped on its own."""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gan_dist.parallel.base import Strategy


class DDPStrategy(Strategy):
    """One all-reduce of each model's gradients per update.

    Buffers (BatchNorm running statistics) are not broadcast on every forward: that would be
    a collective per forward pass and a hang when one rank samples alone. They are made equal
    to rank 0's by `sync_buffers()` before anything is saved.
    """

    name = "ddp"

    def wrap(self, module: nn.Module, name: str) -> nn.Module:
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False,
                                       gradient_as_bucket_view=True)

    def no_sync(self, name: str) -> contextlib.AbstractContextManager:
        return self.wrapped[name].no_sync()

    def sync_buffers(self) -> None:
        for module in self.raw.values():
            for buf in module.buffers():
                dist.broadcast(buf, src=0)
