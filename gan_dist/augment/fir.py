"""2x FIR up- and down-sampling along one image axis, as small dense matrices.

A 2x resampling with an L-tap filter is a linear map along each axis, so an image is resampled
as A_h @ x @ A_w.T: two batched matrix products, fast on every device and differentiable to any
order (R1 through an augmented D). The matrices are built once per size in float64; reflection
at the borders is folded into them.

Conventions (those of StyleGAN2-ADA's upfirdn2d, so that ADA's resampling lines up with the
reference's): pixel k of an image sits at coordinate k; sample n of its 2x upsampling at
n / 2 - 1/4 (two samples per pixel, a quarter pixel either side of its centre). The filter is
normalised to sum 1; upsampling is a convolution with gain 2 per axis, downsampling a
correlation keeping every second output.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch

# Daubechies' least-asymmetric wavelet with 6 vanishing moments: its low-pass decomposition
# filter (PyWavelets' `sym6` dec_lo). Orthonormal: sum h = sqrt(2), sum h[t] h[t + 2k] = [k == 0],
# so upsampling and then downsampling with it gives the image back.
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)


def reflect_index(k: torch.Tensor, n: int) -> torch.Tensor:
    """Indices k folded into [0, n) by mirroring about the first and the last pixel (torch's
    'reflect' padding, repeated as often as needed)."""
    if n == 1:
        return torch.zeros_like(k)
    period = 2 * (n - 1)
    k = k.remainder(period)
    return torch.where(k > n - 1, period - k, k)


def _normalised(taps: Sequence[float]) -> torch.Tensor:
    f = torch.tensor([float(t) for t in taps], dtype=torch.float64)
    if f.numel() % 2:
        raise ValueError(f"a 2x resampling filter needs an even number of taps, got {f.numel()}")
    return f / f.sum()


@functools.lru_cache(maxsize=64)
def _upsample_matrix(n: int, taps: tuple[float, ...], band: int) -> torch.Tensor:
    f = _normalised(taps)
    L = f.numel()
    pad = band + L // 2  # reflected pixels each side: every output's taps land on one
    out = 2 * (n - 1 + 2 * band)
    # output m is upsampled sample n0 + m of the padded signal (pixel k of the padded signal is
    # pixel k - pad of the image); it sits at (n0 + m) / 2 - 1/4 - pad = m / 2 + 1/4 - band
    n0 = 2 * (pad - band) + 1
    m = torch.arange(out).view(-1, 1)
    k = torch.arange(n + 2 * pad).view(1, -1)  # padded pixels
    t = (n0 + m) + (L - 2) // 2 - 2 * k  # tap index: U[s] = 2 sum_k xp[k] f[s + (L - 2) / 2 - 2k]
    weights = torch.where((t >= 0) & (t < L), 2 * f[t.clamp(0, L - 1)], torch.zeros((), dtype=torch.float64))
    src = reflect_index(k.view(-1) - pad, n)  # the image pixel each padded pixel copies
    A = torch.zeros(out, n, dtype=torch.float64)
    A.index_add_(1, src, weights)
    return A


@functools.lru_cache(maxsize=64)
def upsample_matrix(n: int, taps: tuple[float, ...], band: int, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(2 (n - 1 + 2 band), n): n pixels -> their 2x upsampling, reflect-padded, on the
    coordinates [-band, n - 1 + band] (output m at m / 2 + 1/4 - band). Cached per device and
    dtype, so a step copies nothing to the device."""
    return _upsample_matrix(n, tuple(float(t) for t in taps), band).to(device, dtype)


@functools.lru_cache(maxsize=64)
def _downsample_matrix(n: int, taps: tuple[float, ...]) -> torch.Tensor:
    f = _normalised(taps)
    L = f.numel()
    i = torch.arange(n).view(-1, 1)
    t = torch.arange(2 * (n - 1) + L).view(1, -1) - 2 * i
    return torch.where((t >= 0) & (t < L), f[t.clamp(0, L - 1)], torch.zeros((), dtype=torch.float64))


@functools.lru_cache(maxsize=64)
def downsample_matrix(n: int, taps: tuple[float, ...], device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n, 2 (n - 1) + L): 2x samples at s / 2 - (L - 1) / 4 (s = 0, 1, ...) -> n pixels,
    output i = sum_t f[t] u[2 i + t]."""
    return _downsample_matrix(n, tuple(float(t) for t in taps)).to(device, dtype)


@functools.lru_cache(maxsize=64)
def downsample_positions(n: int, L: int, device: torch.device | str = "cpu",
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The coordinates (in pixels of the n-pixel result) of the 2x samples `downsample_matrix` reads."""
    return (torch.arange(2 * (n - 1) + L, dtype=torch.float64) / 2 - (L - 1) / 4).to(device, dtype)


__all__ = ["SYM6", "downsample_matrix", "downsample_positions", "reflect_index", "upsample_matrix"]
