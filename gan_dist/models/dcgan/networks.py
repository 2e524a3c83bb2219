"""DCGAN generator and discriminator (Radford et al.), as in the PyTorch DCGAN example.

The discriminator returns logits: the sigmoid lives in the loss (BCE-with-logits), which is
numerically safe under autocast. Both take a label argument `c` so that every family has the
same call signature, G(z, c) and D(x, c); unconditional networks (num_classes=0) ignore it.

Conditional (num_classes > 0): G concatenates a learned embedding of the class (of the
latent's size, initialised like the latent, N(0, 1)) to z before its first layer; D is a
projection discriminator (Miyato & Koyama 2018): its logit is the unconditional head's output
plus the inner product of a learned class embedding with D's last feature map summed over
positions, D(x, c) = psi(phi(x)) + <e(c), sum phi(x)>.
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
                 norm: str = "batch", num_classes: int = 0) -> None:
        super().__init__()
        self.nz = self.z_dim = nz
        self.num_classes = num_classes
        n = _num_blocks(resolution)
        width = ngf * 2 ** (n - 1)
        self.embed = _embedding(num_classes, nz, std=1.0) if num_classes else None
        blocks = [nn.Sequential(nn.ConvTranspose2d(nz * (2 if num_classes else 1), width, 4, 1, 0, bias=False),
                                _norm(norm, width), nn.ReLU(True))]
        for _ in range(n - 1):
            blocks.append(nn.Sequential(nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False),
                                        _norm(norm, width // 2), nn.ReLU(True)))
            width //= 2
        blocks.append(nn.Sequential(nn.ConvTranspose2d(width, channels, 4, 2, 1, bias=False), nn.Tanh()))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, z: torch.Tensor, c: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(_labels(c, self.num_classes, "generator")).to(z.dtype)], dim=1)
        return self.blocks(z.view(z.shape[0], -1, 1, 1))


class Discriminator(nn.Module):
    """image (N, C, R, R) -> logit (N,)."""

    def __init__(self, ndf: int = 64, channels: int = 3, resolution: int = 64,
                 norm: str = "batch", num_classes: int = 0) -> None:
        super().__init__()
        self.num_classes = num_classes
        n = _num_blocks(resolution)
        blocks = [nn.Sequential(nn.Conv2d(channels, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True))]
        width = ndf
        for _ in range(n - 1):
            blocks.append(nn.Sequential(nn.Conv2d(width, width * 2, 4, 2, 1, bias=False),
                                        _norm(norm, width * 2), nn.LeakyReLU(0.2, True)))
            width *= 2
        blocks.append(nn.Sequential(nn.Conv2d(width, 1, 4, 1, 0, bias=False)))
        self.blocks = nn.Sequential(*blocks)
        self.project = _embedding(num_classes, width, std=0.02) if num_classes else None

    def forward(self, x: torch.Tensor, c: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.project is None:
            return self.blocks(x).flatten()
        *body, head = self.blocks
        for block in body:
            x = block(x)
        e = self.project(_labels(c, self.num_classes, "discriminator"))
        return head(x).flatten() + (x.sum(dim=(2, 3)) * e).sum(dim=1)


def _embedding(num_classes: int, dim: int, std: float) -> nn.Embedding:
    e = nn.Embedding(num_classes, dim)
    e.init_std = std  # read by dcgan_init_
    return e


def _labels(c: Optional[torch.Tensor], num_classes: int, which: str) -> torch.Tensor:
    if c is None:
        raise ValueError(f"this {which} is conditional (model.num_classes={num_classes}): pass the class "
                         "indices c (N,) as its second argument")
    return c.long()


def dcgan_init_(module: nn.Module) -> None:
    """N(0, 0.02) conv weights, N(1, 0.02) norm scales, zero norm shifts (the DCGAN paper)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):  # class embeddings of a conditional model
            nn.init.normal_(m.weight, 0.0, getattr(m, "init_std", 1.0))
