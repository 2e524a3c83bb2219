"""R3GAN's networks (Huang et al. 2024, config E): a plain ResNet without normalisation.

Each stage is a resolution: G grows from a learned 4x4 basis, upsampling between stages; D
mirrors it, downsampling between stages and ending in a depthwise 4x4 basis. A residual block
is 1x1 (expand) -> grouped KxK -> 1x1 (project back) with a biased leaky ReLU after the first
two; nothing normalises the activations, so the initialisation keeps the residual stream's
variance in check instead (fix-up style):

  - every layer draws N(0, gain^2 / fan_in), fan_in counting one group's inputs;
  - inside a block the gain is leaky ReLU's sqrt(2 / (1 + 0.2^2)) times L^(-1/4), with L the
    number of blocks of the network, so that the sum of L branches stays of order one;
  - the last layer of each block starts at zero: every block is the identity at step 0.

Resampling is interpolative FIR filtering: the taps [1, 2, 1] convolved with a box [1, 1]
give a separable 4x4 low-pass (outer product of [1, 3, 3, 1] / 8) that upsamples like a
bilinear interpolation (transposed, stride 2, gain 4) and downsamples like its adjoint.

Labels (model.num_classes > 0) enter as in the paper's conditional models: G concatenates an
embedding of the class to z, D's last layer outputs an embedding-sized vector whose dot
product with an embedding of the class is the logit.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

SLOPE = 0.2
ACT_GAIN = math.sqrt(2.0 / (1.0 + SLOPE ** 2))  # leaky ReLU's variance-preserving gain
LAYERS_PER_BLOCK = 3


def _init_gain(module: nn.Module, gain: float) -> nn.Module:
    """Tag a layer with the gain its weight is drawn with (`r3gan_init_`)."""
    module.init_gain = gain
    return module


def conv(c_in: int, c_out: int, k: int = 1, groups: int = 1, gain: float = 1.0) -> nn.Conv2d:
    return _init_gain(nn.Conv2d(c_in, c_out, k, padding=(k - 1) // 2, groups=groups, bias=False), gain)


class BiasedLeakyReLU(nn.Module):
    """leaky_relu(x + b, 0.2) with a learned per-channel bias b (zero at init), no gain."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return F.leaky_relu(x + self.bias.to(x.dtype).view(shape), SLOPE)


class ResidualBlock(nn.Module):
    """x + conv1x1(act(convKxK_grouped(act(conv1x1(x))))), channels * expansion inside."""

    def __init__(self, channels: int, cardinality: int, expansion: int, kernel_size: int,
                 total_blocks: int) -> None:
        super().__init__()
        inner = channels * expansion
        if inner % cardinality:
            raise ValueError(f"{channels} channels x expansion {expansion} = {inner} is not divisible "
                             f"by the cardinality {cardinality}")
        gain = ACT_GAIN * total_blocks ** (-1.0 / (2 * LAYERS_PER_BLOCK - 2))
        self.expand = conv(channels, inner, 1, gain=gain)
        self.act1 = BiasedLeakyReLU(inner)
        self.grouped = conv(inner, inner, kernel_size, groups=cardinality, gain=gain)
        self.act2 = BiasedLeakyReLU(inner)
        self.project = conv(inner, channels, 1, gain=0.0)  # the block starts as the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.act2(self.grouped(self.act1(self.expand(x)))))


def lowpass_kernel(taps: Sequence[float]) -> torch.Tensor:
    """The separable 4x4 (for 3 taps) interpolation kernel: taps * box [1, 1], outer product, sum 1."""
    t = torch.tensor([float(v) for v in taps], dtype=torch.float64)
    row = F.conv1d(t.view(1, 1, -1), torch.ones(1, 1, 2, dtype=torch.float64), padding=1).flatten()
    k = torch.outer(row, row)
    return (k / k.sum()).float()


class Resample(nn.Module):
    """Depthwise FIR up (x2, transposed convolution) or down (x2, strided convolution) sampling."""

    def __init__(self, taps: Sequence[float], up: bool) -> None:
        super().__init__()
        self.up = up
        self.register_buffer("kernel", lowpass_kernel(taps), persistent=False)
        self.pad = len(taps) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        C = x.shape[1]
        k = self.kernel.to(x.dtype)
        if self.up:  # 4 = up^2 keeps the mean: each output sees a quarter of the taps
            return F.conv_transpose2d(x, (4 * k).expand(C, 1, *k.shape), stride=2, padding=self.pad, groups=C)
        return F.conv2d(x, k.expand(C, 1, *k.shape), stride=2, padding=self.pad, groups=C)


class Transition(nn.Module):
    """Between stages: resample, with a 1x1 convolution where the width changes (at the lower resolution)."""

    def __init__(self, c_in: int, c_out: int, taps: Sequence[float], up: bool) -> None:
        super().__init__()
        self.up = up
        self.resample = Resample(taps, up)
        self.proj = conv(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            x = self.proj(x) if self.proj is not None else x
            return self.resample(x)
        x = self.resample(x)
        return self.proj(x) if self.proj is not None else x


class GenerativeBasis(nn.Module):
    """z -> (N, C, 4, 4): a learned 4x4 basis per channel, scaled by a linear map of z."""

    def __init__(self, z_in: int, channels: int) -> None:
        super().__init__()
        self.basis = nn.Parameter(torch.empty(channels, 4, 4))
        self.linear = _init_gain(nn.Linear(z_in, channels, bias=False), 1.0)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.basis.to(z.dtype).unsqueeze(0) * self.linear(z).unsqueeze(-1).unsqueeze(-1)


class DiscriminativeBasis(nn.Module):
    """(N, C, 4, 4) -> (N, out): a depthwise 4x4 convolution, then a linear map."""

    def __init__(self, channels: int, out: int) -> None:
        super().__init__()
        self.basis = _init_gain(nn.Conv2d(channels, channels, 4, groups=channels, bias=False), 1.0)
        self.linear = _init_gain(nn.Linear(channels, out, bias=False), 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.basis(x).flatten(1))


class Stage(nn.Module):
    """One resolution: G's transition then its blocks; D's blocks then its transition."""

    def __init__(self, transition: nn.Module, blocks: list[nn.Module], transition_first: bool) -> None:
        super().__init__()
        self.layers = nn.Sequential(*([transition] + blocks if transition_first else blocks + [transition]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _blocks(n: int, channels: int, cardinality: int, expansion: int, k: int, total: int) -> list[nn.Module]:
    return [ResidualBlock(channels, cardinality, expansion, k, total) for _ in range(n)]


class Generator(nn.Module):
    """z (N, z_dim) [, class indices c (N,)] -> image (N, channels, R, R), R = 4 * 2^(stages - 1).

    `widths`, `cardinalities`, `blocks`: per stage from 4x4 upwards."""

    def __init__(self, z_dim: int, widths: Sequence[int], cardinalities: Sequence[int], blocks: Sequence[int],
                 expansion: int, channels: int = 3, num_classes: int = 0, kernel_size: int = 3,
                 taps: Sequence[float] = (1, 2, 1)) -> None:
        super().__init__()
        self.z_dim, self.num_classes = z_dim, num_classes
        total = sum(blocks)
        embed = z_dim if num_classes else 0
        stages = [Stage(GenerativeBasis(z_dim + embed, widths[0]),
                        _blocks(blocks[0], widths[0], cardinalities[0], expansion, kernel_size, total), True)]
        for i in range(1, len(widths)):
            stages.append(Stage(Transition(widths[i - 1], widths[i], taps, up=True),
                                _blocks(blocks[i], widths[i], cardinalities[i], expansion, kernel_size, total), True))
        self.stages = nn.ModuleList(stages)
        self.to_image = conv(widths[-1], channels, 1)
        self.embed = _init_gain(nn.Linear(num_classes, embed, bias=False), 1.0) if num_classes else None

    def forward(self, z: torch.Tensor, c: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.embed is not None:
            if c is None:
                raise ValueError(f"this generator is conditional (model.num_classes={self.num_classes}): "
                                 "it needs class labels")
            z = torch.cat([z, self.embed(F.one_hot(c.long(), self.num_classes).to(z.dtype))], dim=1)
        x = z
        for stage in self.stages:
            x = stage(x)
        return self.to_image(x)


class Discriminator(nn.Module):
    """image (N, channels, R, R) [, class indices c] -> logit (N,).

    `widths`, `cardinalities`, `blocks`: per stage from the image's resolution down to 4x4
    (the generator's lists reversed)."""

    def __init__(self, widths: Sequence[int], cardinalities: Sequence[int], blocks: Sequence[int],
                 expansion: int, channels: int = 3, num_classes: int = 0, kernel_size: int = 3,
                 taps: Sequence[float] = (1, 2, 1)) -> None:
        super().__init__()
        self.num_classes = num_classes
        total = sum(blocks)
        embed = widths[-1] if num_classes else 0
        self.from_image = conv(channels, widths[0], 1)
        stages = [Stage(Transition(widths[i], widths[i + 1], taps, up=False),
                        _blocks(blocks[i], widths[i], cardinalities[i], expansion, kernel_size, total), False)
                  for i in range(len(widths) - 1)]
        stages.append(Stage(DiscriminativeBasis(widths[-1], embed or 1),
                            _blocks(blocks[-1], widths[-1], cardinalities[-1], expansion, kernel_size, total), False))
        self.stages = nn.ModuleList(stages)
        self.embed = (_init_gain(nn.Linear(num_classes, embed, bias=False), 1.0 / math.sqrt(embed))
                      if num_classes else None)

    def forward(self, x: torch.Tensor, c: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.from_image(x)
        for stage in self.stages:
            x = stage(x)
        if self.embed is not None:
            if c is None:
                raise ValueError(f"this discriminator is conditional (model.num_classes={self.num_classes}): "
                                 "it needs class labels")
            x = (x * self.embed(F.one_hot(c.long(), self.num_classes).to(x.dtype))).sum(dim=1)
        return x.flatten()


@torch.no_grad()
def r3gan_init_(module: nn.Module) -> None:
    """Variance-scaled normal weights (gain / sqrt(fan_in), zero for a block's last layer),
    N(0, 1) generative bases, zero activation biases."""
    for m in module.modules():
        gain = getattr(m, "init_gain", None)
        if gain is not None:
            w = m.weight
            fan_in = w[0].numel()  # one output's inputs: in_channels / groups * kernel area
            if gain == 0:
                w.zero_()
            else:
                w.normal_(0.0, gain / math.sqrt(fan_in))
        if isinstance(m, GenerativeBasis):
            m.basis.normal_(0.0, 1.0)
        elif isinstance(m, BiasedLeakyReLU):
            m.bias.zero_()
