"""DistributedDataParallel for G and D, each wrapped on its own."""
from __future__ import annotations

import contextlib
import inspect
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gan_dist.parallel.base import Strategy, matmul_convs_wanted


def channels_last_weights(module: nn.Module) -> None:
    """Store the 2-D convolutions' weights NHWC (channels_last), like their gradients.

    With NHWC activations the convolution kernels (oneDNN, cuDNN, train.matmul_conv) return
    each weight gradient NHWC. DDP's gradient buckets are views with the parameters' strides,
    so NCHW weights meant a layout copy of every weight gradient per backward, and where the
    two layouts differ only in a size-1 dimension (a 1-channel image layer) torch stores the
    gradient as it came and DDP warns "Grad strides do not match bucket view strides".
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.weight.dim() == 4:
            w = m.weight.data
            # not w.contiguous(memory_format=...): that keeps NCHW strides when a size-1 dimension
            # makes them pass as NHWC, and those are exactly the strides DDP compares
            nhwc = torch.empty(w.shape, dtype=w.dtype, device=w.device, memory_format=torch.channels_last)
            m.weight.data = nhwc.copy_(w)


# No buffer broadcast in every forward. Newer torch names this forward_sync_buffers and warns on
# every construction with the older broadcast_buffers; the one difference, a broadcast at
# construction, is harmless (every rank builds the same model from one seed).
_NO_FORWARD_BUFFER_SYNC = ({"forward_sync_buffers": False}
                           if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                           else {"broadcast_buffers": False})


class DDPStrategy(Strategy):
    """One all-reduce of each model's gradients per update.

    Buffers (BatchNorm running statistics) are not broadcast on every forward: that would be
    a collective per forward pass and a hang when one rank samples alone. They are made equal
    to rank 0's by `sync_buffers()` before anything is saved.

    With train.channels_last the convolution weights are NHWC (`channels_last_weights`); only
    here, because FSDP2 and ZeRO flatten contiguous parameters. Exported state_dicts are
    contiguous, so any strategy, or a plain model, loads them.
    """

    name = "ddp"

    def wrap(self, module: nn.Module, name: str) -> nn.Module:
        # NHWC activations make NHWC weight gradients: under train.channels_last, and also
        # downstream of matmul convolutions (train.matmul_conv), whose outputs are NHWC
        if self.train_cfg.channels_last or matmul_convs_wanted(self.train_cfg, self.device):
            channels_last_weights(module)  # before DDP: its buckets take the parameters' strides
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, gradient_as_bucket_view=True, **_NO_FORWARD_BUFFER_SYNC)

    def no_sync(self, name: str) -> contextlib.AbstractContextManager:
        return self.wrapped[name].no_sync()

    def sync_buffers(self) -> None:
        for module in self.raw.values():
            for buf in module.buffers():
                dist.broadcast(buf, src=0)

    def full_state_dict(self, name: str) -> Optional[dict[str, torch.Tensor]]:
        full = super().full_state_dict(name)
        return None if full is None else {k: v.contiguous() for k, v in full.items()}
