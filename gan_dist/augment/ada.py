"""ADA's augmentation pipeline (Karras et al. 2020, "bgc"), differentiable, each op applied with
probability p per sample.

    b  x-flip, 90-degree rotations, integer translation (up to 1/8 of the side)
    g  isotropic scaling (lognormal, std 0.2 octaves), rotation (uniform; applied before and
       after the anisotropic scaling with probability 1 - sqrt(1 - p) each, so that some
       rotation happens with probability p), anisotropic scaling (std 0.2 octaves),
       fractional translation (normal, std 1/8 of the side)
    c  brightness (+ N(0, 0.2)), contrast (x 2^N(0, 0.5)), luma flip, hue rotation (uniform
       about the luma axis), saturation (x 2^N(0, 1) off the luma axis)
    o  cutout: a square of half the side, centred uniformly, set to 0 (last)

`augment.p_scale` multiplies p per op (the reference's probability multipliers; R3GAN's pipe
runs the colour ops at 0.5 x p).

The geometric ops compose into one 2x3 matrix per sample (output -> input coordinates, in
grid_sample's [-1, 1] convention) and the images are resampled once, as the reference does
(`resample`): reflect-padded, upsampled 2x with the sym6 wavelet low-pass filter, one bilinear
lookup per 2x output sample, downsampled 2x with the same filter. Band-limited content moves by
the exact sub-pixel amounts (plain bilinear at 1x blurs it), and an identity transform returns
the image (the filter is orthonormal). Unlike the reference, whose reflect padding is as wide as
the batch's transforms need (a size read back to the host), the 2x image holds a fixed
reflected band (3 pixels for the filter plus 1/8 of the side, `band`) and lookups farther out
are mirrored back by coordinate: inside the band the result is the reference's (to float
rounding), beyond it (corners of large rotations or zooms out) mirroring the 2x image is not
quite upsampling the mirrored image, as the filter is not symmetric (a 32-pixel noise image
rotated by 0.3 pi: up to 0.12 in its corners); more than a side beyond the image both read
zeros.

The colour ops compose into one 4x4 matrix per sample. A grayscale image gets the brightness
and contrast part of the colour matrix (its mean gain and offset), as in the reference. Both
steps are linear in the images, so gradients of any order w.r.t. the un-augmented images exist
(R1 through an augmented D).

The per-sample numbers come in fixed columns (`U_*`, `N_*`), so choosing a subset of the
pipeline never changes the draws of the ops that remain.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F

from gan_dist.augment.fir import SYM6, downsample_matrix, downsample_positions, upsample_matrix

PIPELINES = {"b": ("xflip", "rotate90", "xint"), "g": ("scale", "rotate", "aniso", "xfrac"),
             "c": ("brightness", "contrast", "lumaflip", "hue", "saturation"), "o": ("cutout",)}
# uniform columns: (apply, value[, value]) per op; normal columns: values
U = {"xflip": (0, 1), "rotate90": (2, 3), "xint": (4, 5, 6), "scale": (7,), "rotate_pre": (8, 9),
     "aniso": (10,), "rotate_post": (11, 12), "xfrac": (13,), "brightness": (14,), "contrast": (15,),
     "lumaflip": (16, 17), "hue": (18, 19), "saturation": (20,), "cutout": (21, 22, 23)}
N = {"scale": 0, "aniso": 1, "xfrac": (2, 3), "brightness": 4, "contrast": 5, "saturation": 6}
N_UNIFORM, N_NORMAL = 24, 7
XINT_MAX, SCALE_STD, ANISO_STD, XFRAC_STD = 0.125, 0.2, 0.2, 0.125
BRIGHTNESS_STD, CONTRAST_STD, SATURATION_STD = 0.2, 0.5, 1.0
CUTOUT_SIZE = 0.5  # the side of cutout's square, as a fraction of the image's


def band(n: int) -> int:
    """Reflected pixels beyond each border that the 2x upsampling holds: the output's own
    margin for the downsampling filter (3 for 12 taps) plus the integer translation's reach."""
    return 3 + math.ceil(n * XINT_MAX)


def ops_of(pipeline: str) -> tuple[str, ...]:
    return tuple(op for letter in pipeline for op in PIPELINES[letter])


def _eye(n: int, batch: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(n, device=like.device, dtype=like.dtype).expand(batch, n, n).clone()


def _mat3(a, b, c, d, e, f) -> torch.Tensor:
    """(N, 3, 3) [[a, b, c], [d, e, f], [0, 0, 1]] from (N,) tensors."""
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    return torch.stack([a, b, c, d, e, f, zero, zero, one], dim=1).view(-1, 3, 3)


def _scale(sx, sy):
    z = torch.zeros_like(sx)
    return _mat3(sx, z, z, z, sy, z)


def _translate(tx, ty):
    one, z = torch.ones_like(tx), torch.zeros_like(tx)
    return _mat3(one, z, tx, z, one, ty)


def _rotate(theta):
    c, s, z = torch.cos(theta), torch.sin(theta), torch.zeros_like(theta)
    return _mat3(c, -s, z, s, c, z)


def geometric_matrix(ops: tuple[str, ...], u: torch.Tensor, n: torch.Tensor, p: torch.Tensor,
                     size: tuple[int, int], scales: Optional[dict[str, float]] = None) -> torch.Tensor:
    """(N, 3, 3) output -> input coordinates in [-1, 1] of the geometric ops in `ops`, each op
    applied with probability p x its scale (`scales`, default 1)."""
    B, (H, W) = u.shape[0], size
    G = _eye(3, B, u)
    scales = scales or {}

    def on(op: str, prob: Optional[torch.Tensor] = None) -> torch.Tensor:
        return (u[:, U[op][0]] < (p * scales.get(op, 1.0) if prob is None else prob)).to(u.dtype)

    if "xflip" in ops:
        flip = torch.floor(u[:, U["xflip"][1]] * 2) * on("xflip")
        G = G @ _scale(1 - 2 * flip, torch.ones_like(flip))
    if "rotate90" in ops:
        k = torch.floor(u[:, U["rotate90"][1]] * 4) * on("rotate90")
        G = G @ _rotate(-math.pi / 2 * k)
    if "xint" in ops:
        m = on("xint")
        tx = torch.round((u[:, U["xint"][1]] * 2 - 1) * XINT_MAX * W) * m
        ty = torch.round((u[:, U["xint"][2]] * 2 - 1) * XINT_MAX * H) * m
        G = G @ _translate(-2 * tx / W, -2 * ty / H)  # pixels -> [-1, 1] units
    if "scale" in ops:
        s = torch.exp2(n[:, N["scale"]] * SCALE_STD * on("scale"))
        G = G @ _scale(1 / s, 1 / s)
    p_rot = 1 - torch.sqrt((1 - p * scales.get("rotate", 1.0)).clamp(min=0))
    if "rotate" in ops:
        theta = (u[:, U["rotate_pre"][1]] * 2 - 1) * math.pi * on("rotate_pre", p_rot)
        G = G @ _rotate(-theta)
    if "aniso" in ops:
        s = torch.exp2(n[:, N["aniso"]] * ANISO_STD * on("aniso"))
        G = G @ _scale(1 / s, s)
    if "rotate" in ops:
        theta = (u[:, U["rotate_post"][1]] * 2 - 1) * math.pi * on("rotate_post", p_rot)
        G = G @ _rotate(-theta)
    if "xfrac" in ops:
        m = on("xfrac")
        tx, ty = (n[:, c] * XFRAC_STD * m for c in N["xfrac"])
        G = G @ _translate(-2 * tx, -2 * ty)
    return G


def color_matrix(ops: tuple[str, ...], u: torch.Tensor, n: torch.Tensor, p: torch.Tensor,
                 scales: Optional[dict[str, float]] = None) -> torch.Tensor:
    """(N, 4, 4) acting on [r, g, b, 1] of the colour ops in `ops` (probability p x scale)."""
    B = u.shape[0]
    C = _eye(4, B, u)
    I4 = _eye(4, B, u)
    v = torch.tensor([1.0, 1.0, 1.0, 0.0], device=u.device, dtype=u.dtype) / math.sqrt(3)
    vv = torch.outer(v, v).expand(B, 4, 4)

    scales = scales or {}

    def on(op: str) -> torch.Tensor:
        return (u[:, U[op][0]] < p * scales.get(op, 1.0)).to(u.dtype).view(-1, 1, 1)

    if "brightness" in ops:
        b = n[:, N["brightness"]] * BRIGHTNESS_STD * on("brightness").view(-1)
        T = I4.clone()
        T[:, :3, 3] = b.view(-1, 1).expand(B, 3)
        C = T @ C
    if "contrast" in ops:
        c = torch.exp2(n[:, N["contrast"]] * CONTRAST_STD * on("contrast").view(-1))
        S = I4 * torch.cat([c.view(-1, 1).expand(B, 3), torch.ones(B, 1, device=u.device, dtype=u.dtype)], 1).unsqueeze(1)
        C = S @ C
    if "lumaflip" in ops:
        i = torch.floor(u[:, U["lumaflip"][1]] * 2).view(-1, 1, 1) * on("lumaflip")
        C = (I4 - 2 * vv * i) @ C
    if "hue" in ops:
        theta = ((u[:, U["hue"][1]] * 2 - 1) * math.pi).view(-1, 1, 1) * on("hue")
        axis = v[:3]
        K = torch.tensor([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]],
                         device=u.device, dtype=u.dtype)
        R = (torch.cos(theta) * torch.eye(3, device=u.device, dtype=u.dtype) + torch.sin(theta) * K
             + (1 - torch.cos(theta)) * torch.outer(axis, axis))
        H = I4.clone()
        H[:, :3, :3] = R
        C = H @ C
    if "saturation" in ops:
        s = torch.exp2(n[:, N["saturation"]] * SATURATION_STD).view(-1, 1, 1)
        s = 1 + (s - 1) * on("saturation")
        C = (vv + (I4 - vv) * s) @ C
    return C


def _sample_coords(pos: torch.Tensor, n: int) -> torch.Tensor:
    """Pixel coordinates (any shape) of an n-pixel axis -> grid_sample's [-1, 1] over the
    upsampled band [-band(n), n - 1 + band(n)], as the reference pads: inside the band the
    upsampling itself holds the reflected pixels (filtered as the reference filters its padded
    image); points beyond it are mirrored about the first or last pixel; points more than n - 1
    pixels outside the image, beyond the reference's widest padding, read zeros as there."""
    b, c = band(n), (n - 1) / 2
    off = (pos - c).abs()
    mirrored = (n - 1) - ((n - 1) - pos.abs()).abs()  # one reflection about pixel 0 or n - 1
    pos = torch.where(off > c + b - 0.25, mirrored, pos)  # past the band's outermost 2x sample
    grid = (pos + b) * (2 / (n - 1 + 2 * b)) - 1
    return grid.masked_fill_(off > c + (n - 1), -2.0)  # outside: zeros


def resample(x: torch.Tensor, G: torch.Tensor, taps: tuple[float, ...] = SYM6) -> torch.Tensor:
    """x (N, C, H, W) float through the per-sample geometric transforms G (N, 3, 3), output ->
    input in [-1, 1] coordinates, as the reference resamples: the reflect-padded image upsampled
    2x with the wavelet low-pass filter, one bilinear lookup per 2x output sample, and the 2x
    output downsampled with the same filter. An identity G gives x back (the filter is
    orthonormal: `tests/test_augment.py`). The 2x resamplings are matrix products
    (`gan_dist/augment/fir.py`); the reflect padding beyond the filter's band is folded into
    the lookup coordinates instead of padded pixels, so its size never depends on the draws
    (no host sync) and the lookups read a 2x image of the padded size only."""
    B, C, H, W = x.shape
    L = len(taps)
    up_h, up_w = (upsample_matrix(n, taps, band(n), x.device, x.dtype) for n in (H, W))
    down_h, down_w = (downsample_matrix(n, taps, x.device, x.dtype) for n in (H, W))
    up = _along_rows_then_columns(x, up_h, up_w)  # (B, C, 2 (H - 1 + 2 band), 2 (W - 1 + 2 band))
    # the 2x output samples the downsampling reads, in pixel coordinates about the transforms'
    # centre, as [-1, 1] units of the image. The centre is a quarter pixel before the image's
    # (the reference maps the 2x images' pixel centres with a half-sample shift), which
    # largely offsets the filter's delay: a flip or 90-degree rotation of a smooth image is
    # then nearly exact.
    cy, cx = (H - 1) / 2 - 0.25, (W - 1) / 2 - 0.25
    oy, ox = _output_positions(H, L, x.device, x.dtype), _output_positions(W, L, x.device, x.dtype)
    # output [-1, 1] -> input pixel coordinates: a (N, 1, Wo) and an (N, Ho, 1) term per axis,
    # added once at the full size
    g = G[:, :2, :].to(x.dtype)
    pix = [(g[:, k, 0, None, None] * ox.view(1, 1, -1) + g[:, k, 2, None, None]) * half + centre
           + (g[:, k, 1, None, None] * half) * oy.view(1, -1, 1)
           for k, (half, centre) in enumerate(((W / 2, cx), (H / 2, cy)))]
    grid = torch.stack([_sample_coords(pix[0], W), _sample_coords(pix[1], H)], dim=-1)
    looked_up = F.grid_sample(up, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return _along_rows_then_columns(looked_up, down_h, down_w)


@functools.lru_cache(maxsize=16)
def _output_positions(n: int, L: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The 2x samples the downsampling reads along an n-pixel axis, about the transforms' centre
    (a quarter pixel before the image's), in [-1, 1] units of the image."""
    return (downsample_positions(n, L, device, dtype) - ((n - 1) / 2 - 0.25)) / (n / 2)


def _along_rows_then_columns(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """rows @ x @ cols.T for every image and channel: the column map as one large matrix product
    over all image rows, then the row map batched (faster here than the other order or two
    batched products)."""
    B, C, H, W = x.shape
    y = (x.reshape(B * C * H, W) @ cols.T).view(B * C, H, cols.shape[0])
    return torch.matmul(rows, y).view(B, C, rows.shape[0], cols.shape[0])


def cutout_mask(u: torch.Tensor, p: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, 1, H, W): 0 inside a square of side CUTOUT_SIZE (of each side) centred uniformly in
    the image, applied per sample with probability p; 1 elsewhere (as stylegan2-ada's cutout)."""
    H, W = size
    on = (u[:, U["cutout"][0]] < p).to(u.dtype)
    half = (CUTOUT_SIZE / 2) * on.view(-1, 1, 1, 1)  # 0: no square
    cx, cy = (u[:, U["cutout"][k]].view(-1, 1, 1, 1) for k in (1, 2))
    xs = (torch.arange(W, device=u.device, dtype=u.dtype) + 0.5).view(1, 1, 1, -1) / W
    ys = (torch.arange(H, device=u.device, dtype=u.dtype) + 0.5).view(1, 1, -1, 1) / H
    return ((xs - cx).abs() >= half) | ((ys - cy).abs() >= half)


def ada_augment(x: torch.Tensor, u: torch.Tensor, n: torch.Tensor, p: torch.Tensor,
                ops: tuple[str, ...], scales: Optional[dict[str, float]] = None) -> torch.Tensor:
    """x (N, C, H, W) in [-1, 1] through the ops, each applied per sample with probability
    p x its scale (`augment.p_scale`, default 1)."""
    B, C, H, W = x.shape
    dtype = x.dtype
    p = p.to(u.dtype)
    x = x.to(torch.promote_types(dtype, torch.float32), memory_format=torch.contiguous_format)
    if any(op in ops for op in PIPELINES["b"] + PIPELINES["g"]):
        x = resample(x, geometric_matrix(ops, u, n, p, (H, W), scales))
    if any(op in ops for op in PIPELINES["c"]):
        M = color_matrix(ops, u, n, p, scales).to(x.dtype)
        if C == 3:
            x = (M[:, :3, :3] @ x.reshape(B, 3, H * W) + M[:, :3, 3:]).reshape(B, 3, H, W)
        else:  # grayscale: the colour matrix's mean gain and offset (brightness, contrast)
            gain = M[:, :3, :3].mean(dim=1).sum(dim=1)  # the mean row's response to a gray pixel
            x = x * gain.view(-1, 1, 1, 1) + M[:, :3, 3].mean(dim=1).view(-1, 1, 1, 1)
    if "cutout" in ops:
        x = x * cutout_mask(u, p * (scales or {}).get("cutout", 1.0), (H, W)).to(x.dtype)
    return x.to(dtype)


__all__ = ["N_NORMAL", "N_UNIFORM", "PIPELINES", "ada_augment", "color_matrix", "cutout_mask", "geometric_matrix",
           "ops_of", "resample"]
