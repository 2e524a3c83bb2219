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

import contextlib
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


class PointwiseConv(nn.Conv2d):
    """A 1x1 convolution computed as a matrix product over the channels of NHWC rows.

    The same sums as the convolution; on a CPU oneDNN's 1x1 kernels and, above all, their
    derivatives under create_graph (R1 and R2 differentiate the backward) are slower than the
    plain matmuls a linear layer's derivatives of every order are made of. Parameters and
    state_dict keys are those of nn.Conv2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the weight's rows through an NHWC view: its gradient comes back NHWC, as a convolution's does
        w = self.weight.permute(0, 2, 3, 1).reshape(self.out_channels, self.in_channels)
        return F.linear(x.permute(0, 2, 3, 1), w).permute(0, 3, 1, 2)


class DepthwiseBasisConv(nn.Conv2d):
    """The depthwise KxK convolution of a KxK input (D's basis): a per-channel dot product.

    As one batched matmul; oneDNN's depthwise kernels run their double backward (R1, R2)
    channel by channel. Other input sizes take the convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2:] != self.weight.shape[2:]:
            return super().forward(x)
        C, _, kh, kw = self.weight.shape
        w = self.weight.permute(0, 2, 3, 1).reshape(C, kh, kw)  # an NHWC gradient, as above
        return torch.einsum("nchw,chw->nc", x, w).view(x.shape[0], C, 1, 1)


def conv(c_in: int, c_out: int, k: int = 1, groups: int = 1, gain: float = 1.0) -> nn.Conv2d:
    if k == 1 and groups == 1:
        return _init_gain(PointwiseConv(c_in, c_out, 1, bias=False), gain)
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


def lowpass_row(taps: Sequence[float]) -> list[float]:
    """One direction of `lowpass_kernel`: taps * box [1, 1], sum 1 ([1, 3, 3, 1] / 8 for [1, 2, 1])."""
    row = [0.0] * (len(taps) + 1)
    for i, v in enumerate(taps):
        row[i] += float(v)
        row[i + 1] += float(v)
    total = sum(row)
    return [v / total for v in row]


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    nhwc = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if nhwc else torch.contiguous_format


def _down1d(x: torch.Tensor, dim: int, row: Sequence[float], pad: int) -> torch.Tensor:
    """y[i] = sum_t row[t] x[2i + t - pad] along `dim` (zero outside), n -> n / 2."""
    n = x.shape[dim]
    widths = [0, 0] * (x.dim() - 1 - dim) + [pad, pad]
    xp = F.pad(x, widths)
    y = None
    for t, r in enumerate(row):
        term = xp.narrow(dim, t, n - 1)
        term = term[(slice(None),) * dim + (slice(None, None, 2),)]
        y = term * r if y is None else y.add_(term, alpha=r)
    return y


def _up1d(x: torch.Tensor, dim: int, row: Sequence[float], pad: int) -> torch.Tensor:
    """The adjoint of `_down1d` times 2: y[2i + t - pad] += 2 row[t] x[i], n -> 2n."""
    n = x.shape[dim]
    shape = list(x.shape)
    shape[dim] = 2 * n + 2 * pad
    y = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x)).zero_()
    for t, r in enumerate(row):
        target = y.narrow(dim, t, 2 * n - 1)[(slice(None),) * dim + (slice(None, None, 2),)]
        target.add_(x, alpha=2 * r)
    return y.narrow(dim, pad, 2 * n)


class _FIRResample(torch.autograd.Function):
    """gain * down(x) or gain * up(x), separable, on shifted slices, in fp32 (or x's wider dtype).

    down is the strided depthwise convolution with the 4x4 kernel, up the transposed one with 4x
    the kernel; per direction up = 2 down^T, so the backward of down is up / 4 and that of up is
    4 down. The backward calls this Function again: derivatives of every order (R1, R2) are these
    cheap slice sums, where oneDNN runs depthwise double backwards channel by channel."""

    @staticmethod
    def forward(ctx, x, up: bool, row: tuple, pad: int, gain: float):  # noqa: ANN001, ANN205
        ctx.geometry = (up, row, pad, gain)
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        f = _up1d if up else _down1d
        h = f(f(h, 2, row, pad), 3, row, pad)
        if gain != 1:
            h.mul_(gain)
        return h.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        up, row, pad, gain = ctx.geometry
        return _FIRResample.apply(grad, not up, row, pad, gain * (4.0 if up else 0.25)), None, None, None, None


class Resample(nn.Module):
    """Depthwise FIR up (x2, transposed convolution) or down (x2, strided convolution) sampling.

    Computed by `_FIRResample` for even sizes: the same sums as the convolutions with the 4x4
    kernel (`conv_resample`, which other sizes use), within rounding of fp32."""

    def __init__(self, taps: Sequence[float], up: bool) -> None:
        super().__init__()
        self.up = up
        self.register_buffer("kernel", lowpass_kernel(taps), persistent=False)
        self.row = tuple(lowpass_row(taps))
        self.pad = len(taps) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.row) != 2 * self.pad + 2 or x.shape[2] % 2 or x.shape[3] % 2:
            return self.conv_resample(x)
        if torch.is_autocast_enabled(x.device.type):  # in the dtype autocast would run the convolution in
            x = x.to(torch.get_autocast_dtype(x.device.type))
        with torch.autocast(x.device.type, enabled=False):
            return _FIRResample.apply(x, self.up, self.row, self.pad, 1.0)

    def conv_resample(self, x: torch.Tensor) -> torch.Tensor:
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
        self.basis = _init_gain(DepthwiseBasisConv(channels, channels, 4, groups=channels, bias=False), 1.0)
        self.linear = _init_gain(nn.Linear(channels, out, bias=False), 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.basis(x).flatten(1))


class Stage(nn.Module):
    """One resolution: G's transition then its blocks; D's blocks then its transition.

    `bf16` (model.r3gan.bf16_stages): the stage computes in bfloat16, as the reference's
    `FP16Stages` do: its input is cast to bf16 and every convolution and linear layer runs under
    bf16 autocast, which rounds the fp32 master weights to bf16 for the product (their gradients
    come back in fp32); the elementwise layers then see bf16 only, the FIR resampling rounds its
    fp32 sums back to bf16. In a model with such stages (`mixed`), the other stages cast their
    input back to the parameters' dtype (fp32): a bf16 activation never meets an fp32 layer."""

    def __init__(self, transition: nn.Module, blocks: list[nn.Module], transition_first: bool) -> None:
        super().__init__()
        self.layers = nn.Sequential(*([transition] + blocks if transition_first else blocks + [transition]))
        self.bf16 = False
        self.mixed = False

    def cast(self, x: torch.Tensor) -> torch.Tensor:
        """x in the dtype this stage computes in (unchanged in a model without bf16 stages)."""
        if self.bf16:
            return x.to(torch.bfloat16)
        if self.mixed:
            p = next(self.parameters(), None)
            return x.to(p.dtype if p is not None else torch.promote_types(x.dtype, torch.float32))
        return x

    def precision(self, x: torch.Tensor) -> contextlib.AbstractContextManager:
        """bf16 autocast for a bf16 stage's layers (and G's last / D's first 1x1 next to it)."""
        if self.bf16:
            return torch.autocast(x.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the cast is inside the stage: FSDP casts each unit's input to its fp32 param_dtype first
        x = self.cast(x)
        with self.precision(x):
            return self.layers(x)


def set_bf16_stages(stages: Sequence[Stage], chosen: Sequence[int]) -> None:
    """Stages `chosen` (indices) compute in bf16, the others in their parameters' dtype."""
    for i, stage in enumerate(stages):
        stage.bf16 = i in chosen
        stage.mixed = bool(chosen)


def _blocks(n: int, channels: int, cardinality: int, expansion: int, k: int, total: int) -> list[nn.Module]:
    return [ResidualBlock(channels, cardinality, expansion, k, total) for _ in range(n)]


def _check_bf16_stages(n: int, stages: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= stages:
        raise ValueError(f"bf16_stages={n!r} must be an integer from 0 to the {stages} stages")


class Generator(nn.Module):
    """z (N, z_dim) [, class indices c (N,)] -> image (N, channels, R, R), R = 4 * 2^(stages - 1).

    `widths`, `cardinalities`, `blocks`: per stage from 4x4 upwards. `bf16_stages`: the last
    (highest-resolution) stages that compute in bf16 (`Stage`), with the 1x1 to the image after
    them; the image is returned in z's dtype."""

    def __init__(self, z_dim: int, widths: Sequence[int], cardinalities: Sequence[int], blocks: Sequence[int],
                 expansion: int, channels: int = 3, num_classes: int = 0, kernel_size: int = 3,
                 taps: Sequence[float] = (1, 2, 1), bf16_stages: int = 0) -> None:
        super().__init__()
        _check_bf16_stages(bf16_stages, len(widths))
        self.z_dim, self.num_classes = z_dim, num_classes
        total = sum(blocks)
        embed = z_dim if num_classes else 0
        stages = [Stage(GenerativeBasis(z_dim + embed, widths[0]),
                        _blocks(blocks[0], widths[0], cardinalities[0], expansion, kernel_size, total), True)]
        for i in range(1, len(widths)):
            stages.append(Stage(Transition(widths[i - 1], widths[i], taps, up=True),
                                _blocks(blocks[i], widths[i], cardinalities[i], expansion, kernel_size, total), True))
        self.stages = nn.ModuleList(stages)
        self.bf16_stages = bf16_stages
        set_bf16_stages(self.stages, range(len(stages) - bf16_stages, len(stages)))
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
        with self.stages[-1].precision(x):
            img = self.to_image(x)
        return img.to(z.dtype) if self.bf16_stages else img


class Discriminator(nn.Module):
    """image (N, channels, R, R) [, class indices c] -> logit (N,).

    `widths`, `cardinalities`, `blocks`: per stage from the image's resolution down to 4x4
    (the generator's lists reversed). `bf16_stages`: the first (highest-resolution) stages that
    compute in bf16 (`Stage`), with the 1x1 from the image before them; the logit is returned
    in the image's dtype."""

    def __init__(self, widths: Sequence[int], cardinalities: Sequence[int], blocks: Sequence[int],
                 expansion: int, channels: int = 3, num_classes: int = 0, kernel_size: int = 3,
                 taps: Sequence[float] = (1, 2, 1), bf16_stages: int = 0) -> None:
        super().__init__()
        _check_bf16_stages(bf16_stages, len(widths))
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
        self.bf16_stages = bf16_stages
        set_bf16_stages(self.stages, range(bf16_stages))
        self.embed = (_init_gain(nn.Linear(num_classes, embed, bias=False), 1.0 / math.sqrt(embed))
                      if num_classes else None)

    def forward(self, x: torch.Tensor, c: Optional[torch.Tensor] = None) -> torch.Tensor:
        dtype, first = x.dtype, self.stages[0]
        x = first.cast(x)
        with first.precision(x):
            x = self.from_image(x)
        for stage in self.stages:
            x = stage(x)
        if self.embed is not None:
            if c is None:
                raise ValueError(f"this discriminator is conditional (model.num_classes={self.num_classes}): "
                                 "it needs class labels")
            # the embedding in the image's dtype: a bf16 last stage's x is promoted for the product
            x = (x * self.embed(F.one_hot(c.long(), self.num_classes).to(dtype))).sum(dim=1)
        return x.flatten().to(dtype) if self.bf16_stages else x.flatten()


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
