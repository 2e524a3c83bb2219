"""StyleGAN2 networks (Karras et al. 2020, config F) in plain PyTorch.

The architecture follows stylegan2-ada-pytorch's `training/networks.py` (same layers, same
parameter shapes, same equalised-learning-rate gains) with its reference (non-CUDA) operations
written out here: bias + activation + gain + clamp, and [1,3,3,1] FIR resampling (as banded
depthwise convolutions or banded matrix products). Every operation is differentiable twice (R1 and path length).

Deliberate differences (docs/models.md):
- modulated convolutions always scale the activations instead of the weights (the reference's
  `fused_modconv=False`, what it trains with): one convolution for the whole batch;
- the minibatch standard deviation groups consecutive samples, so that a group never spans two
  ranks and N ranks with batch b compute what one process with batch N*b computes;
- noise inputs can be given as one integer seed per sample (`noise_seeds`), so that the noise of
  a sample is a function of its seed only, whatever the rank or batch it is drawn in;
- the tracked average of w is the mean over every rank's batch (one all-reduce of w_dim numbers
  per G forward in training mode, when a process group is up).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gan_dist import rng

SQRT2 = math.sqrt(2.0)
SQRT_HALF = math.sqrt(0.5)
FIR = (1.0, 3.0, 3.0, 1.0)


def channels_at(res: int, channel_base: int, channel_max: int) -> int:
    """Feature maps at resolution `res` (the reference's channels_dict)."""
    return min(channel_base // res, channel_max)


def bias_act(x: torch.Tensor, b: Optional[torch.Tensor], lrelu: bool, gain: float = 1.0,
             clamp: Optional[float] = None) -> torch.Tensor:
    """x + b, then leaky ReLU (slope 0.2, gain sqrt 2) or linear, times `gain`, clamped to +-clamp."""
    if b is not None:
        x = x + b.to(x.dtype).reshape(1, -1, *([1] * (x.dim() - 2)))
    if lrelu:
        x = F.leaky_relu(x, 0.2)
        gain = gain * SQRT2
    if gain != 1:
        x = x * gain
    if clamp is not None and not _within(x, clamp):
        x = x.clamp(-clamp, clamp)
    return x


def _within(x: torch.Tensor, clamp: float) -> bool:
    """Whether clamping x to +-clamp would change nothing, asked on a CPU only: one pass over x
    instead of the clamp and its backward (four passes), with the same values and gradients
    (torch's clamp passes the gradient where min <= x <= max). On a GPU, or when compiling, the
    question would cost a device sync or a graph break: the clamp runs."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    lo, hi = torch.aminmax(x.detach())
    return bool(torch.maximum(-lo, hi) <= clamp)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """t in float32 at least (bf16/fp16 activations summed in fp32; float64 stays float64, so
    that a float64 model computes every step in float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def normalize_2nd_moment(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


def _fir_matrix(n: int, up: int, pad0: int, pad1: int, down: int, gain: float, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    """[n_out, n]: one axis of upfirdn with the [1,3,3,1]/8 taps: zero insertion (`up`), zero
    padding (pad0 before, pad1 after), the taps times `gain`, every `down`-th output kept."""
    n_out = (n * up + pad0 + pad1 - 4) // down + 1
    m = torch.zeros(n_out, n, dtype=torch.float64)
    for j in range(n_out):
        for t, tap in enumerate(FIRFilter.TAPS):
            k = down * j + t - pad0  # index into the zero-inserted input
            if 0 <= k < n * up and k % up == 0:
                m[j, k // up] += tap * gain
    return m.to(device=device, dtype=dtype)


_FIR_CACHE: dict[tuple, torch.Tensor] = {}


def _is_nhwc(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.shape[1] > 1 and not x.is_contiguous() and x.is_contiguous(
        memory_format=torch.channels_last)


def _layout(t: torch.Tensor) -> torch.Tensor:
    """NHWC (channels_last) on a CPU, where oneDNN's NHWC convolutions (forward and backward) ran
    about 2x faster than NCHW at the digits demo's widths; unchanged elsewhere."""
    return t.contiguous(memory_format=torch.channels_last) if t.device.type == "cpu" else t


def conv2d(x: torch.Tensor, w: torch.Tensor, **kw) -> torch.Tensor:
    """F.conv2d in the device's faster layout; outputs stay NHWC through the elementwise ops and
    FIRFilter that follow."""
    if w.shape[2:] == (1, 1):
        # a 1x1 weight is NHWC and NCHW at once, but the NHWC kernels return its gradient with
        # NHWC strides in the size-1 dimensions, which torch keeps and DDP's buckets (laid out
        # as the parameter) warn about: through a 2-D view and back, the gradient is reshaped
        # to contiguous strides (views only, no copy)
        return F.conv2d(_layout(x), w.flatten(1).view(w.shape), **kw)
    return F.conv2d(_layout(x), _layout(w), **kw)


def conv_transpose2d(x: torch.Tensor, w: torch.Tensor, **kw) -> torch.Tensor:
    return F.conv_transpose2d(_layout(x), _layout(w), **kw)


class FIRFilter(nn.Module):
    """The normalised [1,3,3,1] low-pass filter (separable: [1,3,3,1]/8 along each axis), applied
    to every channel alike, with the reference's paddings:
    `up2`: zero insertion and the filter with gain 4 (padding 2 before, 1 after);
    `pad(p)`: the filter with p pixels of zero padding per side, no resampling;
    `down2`: the filter with 1 pixel of padding, every second pixel kept.

    NHWC inputs (the CPU layout, `_layout`) take a depthwise convolution with the 4x4 kernel
    (a transposed one for `up2`). Others take one matrix product per axis with a banded
    [n_out, n] matrix that holds the padding, zero insertion and stride (x @ M_w^T, then
    M_h @ x), instead of a one-channel NCHW convolution (slow CPU backward) or shifted slices
    (each slice's backward writes a zero tensor of the input's size). Both are differentiable to
    any order; `tests/test_stylegan2.py` checks both against the definition (zero insertion,
    padding, a 2-D convolution with the 4x4 kernel)."""

    TAPS = tuple(t / 8 for t in FIR)

    @staticmethod
    def _matrix(n: int, up: int, pad0: int, pad1: int, down: int, gain: float, like: torch.Tensor) -> torch.Tensor:
        key = (n, up, pad0, pad1, down, gain, like.dtype, like.device)
        m = _FIR_CACHE.get(key)
        if m is None:
            m = _FIR_CACHE[key] = _fir_matrix(n, up, pad0, pad1, down, gain, like.dtype, like.device)
        return m

    def _resample(self, x: torch.Tensor, up: int, pad0: int, pad1: int, down: int, gain: float) -> torch.Tensor:
        mh = self._matrix(x.shape[2], up, pad0, pad1, down, gain, x)
        mw = mh if x.shape[3] == x.shape[2] else self._matrix(x.shape[3], up, pad0, pad1, down, gain, x)
        return torch.matmul(mh, torch.matmul(x, mw.t()))

    @staticmethod
    def _kernel(x: torch.Tensor, gain: float) -> torch.Tensor:
        """The 4x4 kernel times `gain`, one per channel of x, NHWC: a depthwise convolution's weight."""
        key = ("depthwise", x.shape[1], gain, x.dtype, x.device)
        k = _FIR_CACHE.get(key)
        if k is None:
            taps = torch.tensor(FIRFilter.TAPS, dtype=torch.float64)
            k = (torch.outer(taps, taps) * gain).to(device=x.device, dtype=x.dtype)
            k = _FIR_CACHE[key] = k.expand(x.shape[1], 1, 4, 4).contiguous(memory_format=torch.channels_last)
        return k

    # NHWC activations (convolutions on a CPU, `_layout`) take depthwise convolutions with the
    # 4x4 kernel instead: oneDNN's NHWC depthwise kernels ran 3-5x faster than the matrix products
    # there; the same sums (the definition test covers both layouts)
    def pad(self, x: torch.Tensor, p: int) -> torch.Tensor:
        if _is_nhwc(x):
            return F.conv2d(x, self._kernel(x, 1.0), padding=p, groups=x.shape[1])
        return self._resample(x, 1, p, p, 1, 1.0)

    def down2(self, x: torch.Tensor) -> torch.Tensor:
        if _is_nhwc(x):
            return F.conv2d(x, self._kernel(x, 1.0), padding=1, stride=2, groups=x.shape[1])
        return self._resample(x, 1, 1, 1, 2, 1.0)

    def up2(self, x: torch.Tensor) -> torch.Tensor:
        if _is_nhwc(x):  # zero insertion, padding (2, 1) and the filter: a stride-2 transposed convolution
            return F.conv_transpose2d(x, self._kernel(x, 4.0), stride=2, padding=1, groups=x.shape[1])
        return self._resample(x, 2, 2, 1, 1, 2.0)  # gain 4: 2 per axis


class FullyConnected(nn.Module):
    """Equalised-lr linear layer: weights drawn N(0, 1/lr_mult^2), used times lr_mult/sqrt(in)."""

    def __init__(self, in_features: int, out_features: int, lrelu: bool = False, lr_mult: float = 1.0,
                 bias_init: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features))
        self.lrelu, self.lr_mult, self.bias_init = lrelu, lr_mult, bias_init
        self.weight_gain = lr_mult / math.sqrt(in_features)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.normal_().div_(self.lr_mult)
            self.bias.fill_(self.bias_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias.to(x.dtype) * self.lr_mult
        # (w x^T)^T, not x w^T (addmm, matmul, F.linear): with R1's double backward the weight
        # gets two gradients (first and second order), and their sum took the strides of the
        # transpose ((1, 1) for a [1, n] weight), which DDP's gradient buckets (laid out as the
        # parameter) warn about and copy; with w as the left factor both terms are laid out as w.
        # The same dot products
        if not self.lrelu:
            return torch.addmm(b.unsqueeze(1), w, x.t()).t()
        return bias_act(torch.mm(w, x.t()).t(), b, lrelu=True)


def one_hot_labels(c: Optional[torch.Tensor], c_dim: int, which: str) -> torch.Tensor:
    """Class indices (N,) as the one-hot float rows the reference's label embeddings take."""
    if c is None:
        raise ValueError(f"this {which} is conditional (model.num_classes={c_dim}): pass the class "
                         "indices c (N,) as its second argument")
    return F.one_hot(c.long().reshape(-1), c_dim).float()


class MappingNetwork(nn.Module):
    """[z (normalised), embed(one-hot c) (normalised)] -> w through `num_layers` FC layers with lr
    multiplier `lr_mult`; tracks the average w (for truncation) with decay `w_avg_beta` in
    training mode, and broadcasts it to `num_ws` layers.

    `c_dim > 0` embeds the label with an FC layer of `w_dim` features (lr multiplier 1) and
    concatenates it to z, as the reference. One average of w is tracked over every class (as the
    reference): truncation pulls a conditional w toward the all-class average. D's label mapping
    is the same network with `z_dim=0`, `num_ws=None` (no broadcast) and `w_avg_beta=None`."""

    def __init__(self, z_dim: int, w_dim: int, num_ws: Optional[int], num_layers: int = 8, lr_mult: float = 0.01,
                 w_avg_beta: Optional[float] = 0.995, c_dim: int = 0) -> None:
        super().__init__()
        self.z_dim, self.w_dim, self.num_ws, self.w_avg_beta, self.c_dim = z_dim, w_dim, num_ws, w_avg_beta, c_dim
        self.embed = FullyConnected(c_dim, w_dim) if c_dim else None
        features = [z_dim + (w_dim if c_dim else 0)] + [w_dim] * num_layers
        self.layers = nn.ModuleList(FullyConnected(features[i], features[i + 1], lrelu=True, lr_mult=lr_mult)
                                    for i in range(num_layers))
        self.tracks_w_avg = num_ws is not None and w_avg_beta is not None
        if self.tracks_w_avg:
            self.register_buffer("w_avg", torch.zeros(w_dim))
        # the average over every rank's batch: one all-reduce of w_dim numbers per training forward
        self.sync_w_avg = True

    def forward(self, z: Optional[torch.Tensor], c: Optional[torch.Tensor] = None, truncation_psi: float = 1.0,
                truncation_cutoff: Optional[int] = None, update_w_avg: bool = True) -> torch.Tensor:
        dtype = self.layers[0].weight.dtype
        parts = [normalize_2nd_moment(z.to(dtype))] if self.z_dim else []
        if self.embed is not None:
            y = self.embed(one_hot_labels(c, self.c_dim, "generator" if self.z_dim else "discriminator").to(dtype))
            parts.append(normalize_2nd_moment(y))
        x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        for layer in self.layers:
            x = layer(x)
        if not self.tracks_w_avg:
            return x
        if update_w_avg and self.training:
            with torch.no_grad():
                mean = _wide(x.detach()).mean(dim=0)
                if self.sync_w_avg:
                    from gan_dist.distributed import all_reduce_mean
                    mean = all_reduce_mean(mean)
                self.w_avg.copy_(mean.lerp(_wide(self.w_avg), self.w_avg_beta))
        x = x.unsqueeze(1).repeat(1, self.num_ws, 1)
        if truncation_psi != 1:
            avg = self.w_avg.to(x.dtype)
            cut = self.num_ws if truncation_cutoff is None else truncation_cutoff
            x = torch.cat([avg.lerp(x[:, :cut], truncation_psi), x[:, cut:]], dim=1)
        return x


class SynthesisLayer(nn.Module):
    """Modulated 3x3 convolution with weight demodulation (optionally upsampling x2 first), noise
    input with a learned strength, bias and leaky ReLU."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, up: bool,
                 layer_index: int, conv_clamp: Optional[float]) -> None:
        super().__init__()
        self.resolution, self.up, self.layer_index, self.conv_clamp = resolution, up, layer_index, conv_clamp
        self.affine = FullyConnected(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))
        # shape [1], not the reference's scalar: FSDP2 cannot shard a 0-dim parameter
        self.noise_strength = nn.Parameter(torch.empty(1))
        self.bias = nn.Parameter(torch.empty(out_channels))
        self.register_buffer("noise_const", torch.empty(resolution, resolution))
        self.fir = FIRFilter() if up else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.normal_()
            self.noise_strength.zero_()
            self.bias.zero_()
            self.noise_const.normal_()

    def noise(self, x: torch.Tensor, noise_seeds: Optional[Sequence[int]], noise_mode: str) -> Optional[torch.Tensor]:
        N, R = x.shape[0], self.resolution
        if noise_mode == "none":
            return None
        if noise_mode not in ("random", "const"):
            raise ValueError(f"noise_mode={noise_mode!r} is not one of: random, const, none")
        if noise_mode == "const":
            return self.noise_const.to(x.dtype)[None, None] * self.noise_strength.to(x.dtype)
        if noise_seeds is None:
            n = torch.randn(N, 1, R, R, device=x.device)
        else:
            if len(noise_seeds) != N:
                raise ValueError(f"noise_seeds has {len(noise_seeds)} seeds for a batch of {N}")
            n = torch.empty(N, 1, R, R, device=x.device)
            gen = torch.Generator(device=x.device)
            for k, s in enumerate(noise_seeds):
                gen.manual_seed(rng.mix(int(s), self.layer_index))
                torch.randn((1, R, R), generator=gen, device=x.device, out=n[k])
        return n.to(x.dtype) * self.noise_strength.to(x.dtype)

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_seeds: Optional[Sequence[int]] = None,
                noise_mode: str = "random", gain: float = 1.0) -> torch.Tensor:
        styles = self.affine(w)  # [N, I]
        weight = self.weight.to(x.dtype)
        # demodulation: 1/sqrt(sum_{i,k} (w_oik s_i)^2), computed without a per-sample weight copy
        dcoefs = (styles.square() @ weight.square().sum(dim=(2, 3)).t() + 1e-8).rsqrt()  # [N, O]
        x = x * styles.reshape(*styles.shape, 1, 1)
        if self.up:
            x = conv_transpose2d(x, weight.transpose(0, 1), stride=2)
            x = self.fir.pad(x, 1) * 4
        else:
            x = conv2d(x, weight, padding=1)
        x = x * dcoefs.reshape(*dcoefs.shape, 1, 1)
        n = self.noise(x, noise_seeds, noise_mode)
        if n is not None:
            x = x + n
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, self.bias, lrelu=True, gain=gain, clamp=clamp)


class ToRGB(nn.Module):
    """Modulated 1x1 convolution to image channels, without demodulation."""

    def __init__(self, in_channels: int, img_channels: int, w_dim: int, conv_clamp: Optional[float]) -> None:
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnected(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.empty(img_channels, in_channels, 1, 1))
        self.bias = nn.Parameter(torch.empty(img_channels))
        self.weight_gain = 1 / math.sqrt(in_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.normal_()
            self.bias.zero_()

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        styles = self.affine(w) * self.weight_gain
        x = conv2d(x * styles.reshape(*styles.shape, 1, 1), self.weight.to(x.dtype))
        return bias_act(x, self.bias, lrelu=False, clamp=self.conv_clamp)


class SynthesisBlock(nn.Module):
    """One resolution of the skip generator: (const 4x4 | conv0 up) -> conv1 -> toRGB, added to
    the upsampled image of the previous block."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, img_channels: int,
                 first_layer: int, conv_clamp: Optional[float]) -> None:
        super().__init__()
        self.resolution = resolution
        self.const = nn.Parameter(torch.empty(out_channels, 4, 4)) if in_channels == 0 else None
        self.conv0 = (SynthesisLayer(in_channels, out_channels, w_dim, resolution, True, first_layer, conv_clamp)
                      if in_channels else None)
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution, False,
                                    first_layer + (1 if in_channels else 0), conv_clamp)
        self.torgb = ToRGB(out_channels, img_channels, w_dim, conv_clamp)
        self.fir = FIRFilter() if in_channels else None
        self.num_conv = 2 if in_channels else 1
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.const is not None:
            with torch.no_grad():
                self.const.normal_()

    def forward(self, x: Optional[torch.Tensor], img: Optional[torch.Tensor], ws: torch.Tensor,
                noise_seeds: Optional[Sequence[int]], noise_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        # ws: [N, num_conv + 1, w_dim]; the last one (toRGB) is also the next block's first
        if self.const is not None:
            x = self.const.to(ws.dtype).unsqueeze(0).repeat(ws.shape[0], 1, 1, 1)
            x = self.conv1(x, ws[:, 0], noise_seeds, noise_mode)
        else:
            x = self.conv0(x, ws[:, 0], noise_seeds, noise_mode)
            x = self.conv1(x, ws[:, 1], noise_seeds, noise_mode)
        y = _wide(self.torgb(x, ws[:, self.num_conv]))
        img = y if img is None else self.fir.up2(img) + y
        return x, img


class SynthesisNetwork(nn.Module):
    def __init__(self, w_dim: int, resolution: int, img_channels: int, channel_base: int, channel_max: int,
                 conv_clamp: Optional[float]) -> None:
        super().__init__()
        self.resolutions = [2 ** i for i in range(2, int(math.log2(resolution)) + 1)]
        blocks, layer = [], 0
        for res in self.resolutions:
            cin = channels_at(res // 2, channel_base, channel_max) if res > 4 else 0
            block = SynthesisBlock(cin, channels_at(res, channel_base, channel_max), w_dim, res, img_channels,
                                   layer, conv_clamp)
            layer += block.num_conv
            blocks.append(block)
        self.blocks = nn.ModuleList(blocks)
        self.num_ws = layer + 1  # every conv, plus the last toRGB

    def forward(self, ws: torch.Tensor, noise_seeds: Optional[Sequence[int]] = None,
                noise_mode: str = "random") -> torch.Tensor:
        x = img = None
        i = 0
        for block in self.blocks:
            x, img = block(x, img, ws[:, i:i + block.num_conv + 1], noise_seeds, noise_mode)
            i += block.num_conv
        return img


class Generator(nn.Module):
    """G(z, c) -> images in about [-1, 1]. Training passes per-sample draws (gan_dist.rng):
    `mix_z`/`mix_cutoff` (style mixing: the w of `mix_z` from layer `mix_cutoff` on; a cutoff of
    num_ws mixes nothing) and `noise_seeds` (one integer per sample for every noise input).
    Without them there is no mixing, and the noise follows `noise_mode`: by default 'random'
    (torch's global RNG) in training mode and 'const' (the stored noise buffers, as the
    reference's generate.py) in eval mode, so that a sample is a function of its z only; 'none'
    adds no noise. `ws_delta` ([N, num_ws, w_dim], zeros) is added to the w of every layer: an
    input to take the images' Jacobian by (path length), whatever wrapper holds G.
    Conditional (`c_dim` classes): `c` holds class indices (N,), embedded by the mapping network."""

    def __init__(self, z_dim: int, w_dim: int, resolution: int, img_channels: int, mapping_layers: int = 8,
                 channel_base: int = 32768, channel_max: int = 512, conv_clamp: Optional[float] = None,
                 mapping_lr_mult: float = 0.01, w_avg_beta: float = 0.995, c_dim: int = 0) -> None:
        super().__init__()
        self.z_dim, self.w_dim, self.resolution, self.img_channels = z_dim, w_dim, resolution, img_channels
        self.c_dim = c_dim
        self.synthesis = SynthesisNetwork(w_dim, resolution, img_channels, channel_base, channel_max, conv_clamp)
        self.num_ws = self.synthesis.num_ws
        self.nz = z_dim  # the latent size samplers read (gan_dist.generate)
        self.truncation_psi = 1.0  # the default of forward's truncation_psi (generate --truncation sets it)
        self.mapping = MappingNetwork(z_dim, w_dim, self.num_ws, mapping_layers, mapping_lr_mult, w_avg_beta, c_dim)

    def forward(self, z: torch.Tensor, c: Optional[torch.Tensor] = None, mix_z: Optional[torch.Tensor] = None,
                mix_cutoff: Optional[torch.Tensor] = None, noise_seeds: Optional[Sequence[int]] = None,
                noise_mode: Optional[str] = None, truncation_psi: Optional[float] = None,
                truncation_cutoff: Optional[int] = None,
                ws_delta: Optional[torch.Tensor] = None, return_ws: bool = False):
        if truncation_psi is None:
            truncation_psi = self.truncation_psi
        ws = self.mapping(z, c, truncation_psi, truncation_cutoff)
        if mix_z is not None:  # the second latent with the sample's own label, as the reference
            ws2 = self.mapping(mix_z, c, truncation_psi, truncation_cutoff, update_w_avg=False)
            later = torch.arange(self.num_ws, device=ws.device)[None, :] >= mix_cutoff.to(ws.device)[:, None]
            ws = torch.where(later[..., None], ws2, ws)
        if ws_delta is not None:  # zeros to differentiate the images by: d img / d delta = d img / d w
            ws = ws + ws_delta.to(ws.dtype)
        if noise_mode is None:
            noise_mode = "random" if self.training or noise_seeds is not None else "const"
        img = self.synthesis(ws, noise_seeds, noise_mode)
        return (img, ws) if return_ws else img


class Conv2dLayer(nn.Module):
    """Equalised-lr convolution of D (kernel 1 or 3), optionally FIR-downsampling x2, with bias
    (optional), leaky ReLU or linear, and clamping."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, lrelu: bool = True, down: bool = False,
                 bias: bool = True, conv_clamp: Optional[float] = None) -> None:
        super().__init__()
        self.kernel, self.lrelu, self.down, self.conv_clamp = kernel, lrelu, down, conv_clamp
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel, kernel))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.weight_gain = 1 / math.sqrt(in_channels * kernel * kernel)
        self.fir = FIRFilter() if down else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.normal_()
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        if self.down and self.kernel == 1:
            x = conv2d(self.fir.down2(x), w)
        elif self.down:
            x = conv2d(self.fir.pad(x, 2), w, stride=2)
        else:
            x = conv2d(x, w, padding=self.kernel // 2)
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, self.bias, lrelu=self.lrelu, gain=gain, clamp=clamp)


class DiscriminatorBlock(nn.Module):
    """Residual D block: [fromRGB] -> conv0 -> conv1 (down), plus a 1x1 downsampled skip, each
    branch scaled by sqrt(1/2)."""

    def __init__(self, tmp_channels: int, out_channels: int, img_channels: int, first: bool,
                 conv_clamp: Optional[float]) -> None:
        super().__init__()
        self.fromrgb = Conv2dLayer(img_channels, tmp_channels, 1, conv_clamp=conv_clamp) if first else None
        self.conv0 = Conv2dLayer(tmp_channels, tmp_channels, 3, conv_clamp=conv_clamp)
        self.conv1 = Conv2dLayer(tmp_channels, out_channels, 3, down=True, conv_clamp=conv_clamp)
        self.skip = Conv2dLayer(tmp_channels, out_channels, 1, lrelu=False, down=True, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fromrgb is not None:
            x = self.fromrgb(x)
        y = self.skip(x, gain=SQRT_HALF)
        x = self.conv1(self.conv0(x), gain=SQRT_HALF)
        return y + x


class MinibatchStd(nn.Module):
    """Appends the standard deviation of each feature over a group of `group_size` consecutive
    samples, averaged to `num_channels` maps."""

    def __init__(self, group_size: int, num_channels: int = 1) -> None:
        super().__init__()
        self.group_size, self.num_channels = group_size, num_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, C, H, W = x.shape
        G, Fc = min(self.group_size, N), self.num_channels
        if N % G:
            raise ValueError(f"the minibatch standard deviation groups {G} samples, and a batch of {N} "
                             f"is not a multiple of it (model.stylegan2.mbstd_group, train.batch_size)")
        y = _wide(x).reshape(N // G, G, Fc, C // Fc, H, W)
        y = (y - y.mean(dim=1, keepdim=True)).square().mean(dim=1)
        y = (y + 1e-8).sqrt().mean(dim=(2, 3, 4))  # [n, F]
        y = y.repeat_interleave(G, dim=0).reshape(N, Fc, 1, 1).expand(N, Fc, H, W)
        return torch.cat([x, y.to(x.dtype)], dim=1)


class DiscriminatorEpilogue(nn.Module):
    """4x4: minibatch std, conv, fc, out. Conditional (`cmap_dim > 0`): `out` has cmap_dim
    features, and the logit is their projection onto the mapped label, over sqrt(cmap_dim)."""

    def __init__(self, channels: int, mbstd_group: int, conv_clamp: Optional[float], cmap_dim: int = 0) -> None:
        super().__init__()
        self.cmap_dim = cmap_dim
        self.mbstd = MinibatchStd(mbstd_group, 1)
        self.conv = Conv2dLayer(channels + 1, channels, 3, conv_clamp=conv_clamp)
        self.fc = FullyConnected(channels * 16, channels, lrelu=True)
        self.out = FullyConnected(channels, cmap_dim or 1)

    def forward(self, x: torch.Tensor, cmap: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.conv(self.mbstd(x))
        x = self.out(self.fc(x.flatten(1)))
        if self.cmap_dim:
            x = (x * cmap.to(x.dtype)).sum(dim=1, keepdim=True) * (1 / math.sqrt(self.cmap_dim))
        return x


class Discriminator(nn.Module):
    """D(x, c) -> one logit per image: residual blocks from `resolution` down to 8, then the 4x4
    epilogue (minibatch std, conv, fc, out). Conditional (`c_dim` classes): a label mapping
    network (`mapping_layers` FC layers of cmap_dim = the 4x4 width, lr multiplier 0.01; the
    reference's D always has 8, whatever G's depth) whose output the epilogue projects onto."""

    def __init__(self, resolution: int, img_channels: int, channel_base: int = 32768, channel_max: int = 512,
                 mbstd_group: int = 4, conv_clamp: Optional[float] = None, c_dim: int = 0,
                 mapping_layers: int = 8) -> None:
        super().__init__()
        self.c_dim = c_dim
        self.resolutions = [2 ** i for i in range(int(math.log2(resolution)), 2, -1)]
        ch = lambda r: channels_at(r, channel_base, channel_max)  # noqa: E731
        self.blocks = nn.ModuleList(DiscriminatorBlock(ch(r), ch(r // 2), img_channels, r == resolution, conv_clamp)
                                    for r in self.resolutions)
        cmap_dim = ch(4) if c_dim else 0
        self.mapping = (MappingNetwork(0, cmap_dim, None, mapping_layers, w_avg_beta=None, c_dim=c_dim)
                        if c_dim else None)
        self.epilogue = DiscriminatorEpilogue(ch(4), mbstd_group, conv_clamp, cmap_dim)

    def forward(self, img: torch.Tensor, c: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = img
        for block in self.blocks:
            x = block(x)
        cmap = self.mapping(None, c) if self.mapping is not None else None
        return self.epilogue(x, cmap)


def reset_parameters_(module: nn.Module) -> None:
    """Draw every layer's weights again from torch's global RNG, as the reference initialises them."""
    for m in module.modules():
        if isinstance(m, (FullyConnected, SynthesisLayer, ToRGB, SynthesisBlock, Conv2dLayer)):
            m.reset_parameters()
