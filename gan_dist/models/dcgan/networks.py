"""DCGAN generator and discriminator (Radford et al.), as in the PyTorch DCGAN example.

The discriminator returns logits: the sigmoid lives in the loss (BCE-with-logits), which is
numerically safe under autocast. Both take a label argument `c` so that every family has the
same call signature, G(z, c) and D(x, c); these unconditional networks ignore it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.Identity()


def _num_blocks(resolution: int) -> int:
    if resolution not in (32, 64):
        raise ValueError(f"DCGAN supports resolution 32 or 64, got {resolution}")
    return 3 if resolution == 32 else 4


class Generator(nn.Module):
    """z (N, nz) -> image (N, C, R, R) in [-1, 1]."""

    def __init__(self, nz: int = 100, ngf: int = 64, channels: int = 3, resolution: int = 64,
                 norm: str = "batch") -> None:
        super().__init__()
        self.nz = nz
        n = _num_blocks(resolution)
        width = ngf * 2 ** (n - 1)
        blocks = [nn.Sequential(nn.ConvTranspose2d(nz, width, 4, 1, 0, bias=False),
                                _norm(norm, width), nn.ReLU(True))]
        for _ in range(n - 1):
            blocks.append(nn.Sequential(nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False),
                                        _norm(norm, width // 2), nn.ReLU(True)))
            width //= 2
        blocks.append(nn.Sequential(nn.ConvTranspose2d(width, channels, 4, 2, 1, bias=False), nn.Tanh()))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, z: torch.Tensor, c: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.blocks(z.view(z.shape[0], self.nz, 1, 1))


class Discriminator(nn.Module):
    """image (N, C, R, R) -> logit (N,)."""

    def __init__(self, ndf: int = 64, channels: int = 3, resolution: int = 64,
                 norm: str = "batch") -> None:
        super().__init__()
        n = _num_blocks(resolution)
        blocks = [nn.Sequential(nn.Conv2d(channels, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True))]
        width = ndf
        for _ in range(n - 1):
            blocks.append(nn.Sequential(nn.Conv2d(width, width * 2, 4, 2, 1, bias=False),
                                        _norm(norm, width * 2), nn.LeakyReLU(0.2, True)))
            width *= 2
        blocks.append(nn.Sequential(nn.Conv2d(width, 1, 4, 1, 0, bias=False)))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor, c: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.blocks(x).flatten()


def dcgan_init_(module: nn.Module) -> None:
    """N(0, 0.02) conv weights, N(1, 0.02) norm scales, zero norm shifts (the DCGAN paper)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
