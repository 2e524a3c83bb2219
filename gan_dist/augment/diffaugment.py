"""DiffAugment (Zhao et al. 2020): the same random, differentiable transforms on every image D sees.

    color        brightness + U(-0.5, 0.5); saturation x (2 U) around the pixel's channel mean;
                 contrast x (U + 0.5) around the image mean
    translation  integer shift of up to 1/8 of the side in each direction, zeros shifted in
    cutout       a square of half the side at a uniform position set to zero

Every transform applies to every image (no probability), each with its own per-sample numbers
(`u`, uniform in [0, 1), columns handed out in order). Images are in [-1, 1]. All of it is
arithmetic, indexing and masking: differentiable to any order with respect to the images, so
R1/R2 through an augmented D take the gradient with respect to the un-augmented input.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

TRANSLATION_RATIO = 0.125
CUTOUT_RATIO = 0.5


def _col(u: torch.Tensor, i: int, dtype: torch.dtype) -> torch.Tensor:
    """Column i of the draws as (N, 1, 1, 1)."""
    return u[:, i].to(dtype).view(-1, 1, 1, 1)


def color(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Brightness, saturation, then contrast, as one per-pixel affine map.

    With b = U - 0.5, s = 2U, c = U + 0.5, m_c the pixel's channel mean and m the image mean,
    the three steps in order give c s x + c (1 - s) m_c + (1 - c) m + b (the brightness shift
    moves both means by b, and the saturation step keeps the image mean): one pass over the
    image, computed in float32 (or wider), instead of five."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    b, s, c = _col(u, 0, xf.dtype) - 0.5, _col(u, 1, xf.dtype) * 2, _col(u, 2, xf.dtype) + 0.5
    pixel_mean = xf.mean(dim=1, keepdim=True)
    image_mean = pixel_mean.mean(dim=(2, 3), keepdim=True)
    out = torch.addcmul((1 - c) * image_mean + b, c * (1 - s), pixel_mean)
    return torch.addcmul(out, c * s, xf).to(x.dtype)


class _Shift(torch.autograd.Function):
    """out[n, :, h, w] = x[n, :, h - dy[n], w - dx[n]], zero where that lies outside.

    The zero-padded image's rows are picked with one index_select (whole rows at a time) and
    its columns with one gather. The adjoint of a shift with zeros shifted in is the opposite
    shift, so the backward is this function again: as cheap as the forward (instead of the
    scatter-adds of indexing's backward) and itself differentiable, to any order."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, pad_h: int, pad_w: int) -> torch.Tensor:
        ctx.save_for_backward(dy, dx)
        ctx.pads = (pad_h, pad_w)
        N, C, H, W = x.shape
        Hp, Wp = H + 2 * pad_h, W + 2 * pad_w
        padded = F.pad(x.contiguous(), (pad_w, pad_w, pad_h, pad_h))
        rows = torch.arange(H, device=x.device).view(1, -1) - dy.view(-1, 1) + pad_h  # (N, H) in the padded image
        rows = (torch.arange(N * C, device=x.device).view(N, C, 1) * Hp + rows.view(N, 1, H)).view(-1)
        picked = padded.view(N * C * Hp, Wp).index_select(0, rows).view(N, C, H, Wp)
        cols = torch.arange(W, device=x.device).view(1, -1) - dx.view(-1, 1) + pad_w  # (N, W)
        return picked.gather(3, cols.view(N, 1, 1, W).expand(N, C, H, W))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dy, dx = ctx.saved_tensors
        return _Shift.apply(grad, -dy, -dx, *ctx.pads), None, None, None, None


def translation(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    _, _, H, W = x.shape
    sh, sw = int(H * TRANSLATION_RATIO + 0.5), int(W * TRANSLATION_RATIO + 0.5)
    # a uniform integer in [-s, s]; (2s + 1) * u < 2s + 1 always
    dy = (u[:, 0] * (2 * sh + 1)).floor().long() - sh
    dx = (u[:, 1] * (2 * sw + 1)).floor().long() - sw
    return _Shift.apply(x, dy, dx, sh, sw)


def cutout(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    N, _, H, W = x.shape
    ch, cw = int(H * CUTOUT_RATIO + 0.5), int(W * CUTOUT_RATIO + 0.5)
    # the square's top-left corner: the whole square may hang over the border by up to half its side
    top = (u[:, 0] * (H + 1 - ch % 2)).floor().long() - ch // 2
    left = (u[:, 1] * (W + 1 - cw % 2)).floor().long() - cw // 2
    r = torch.arange(H, device=x.device).view(1, -1)
    c = torch.arange(W, device=x.device).view(1, -1)
    in_r = (r >= top.view(-1, 1)) & (r < top.view(-1, 1) + ch)
    in_c = (c >= left.view(-1, 1)) & (c < left.view(-1, 1) + cw)
    keep = ~(in_r.view(N, 1, H, 1) & in_c.view(N, 1, 1, W))  # (N, 1, H, W), broadcast over channels
    return x * keep.to(x.dtype)


# name -> (transform, uniform numbers it takes per sample)
TRANSFORMS: dict[str, tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], int]] = {
    "color": (color, 3), "translation": (translation, 2), "cutout": (cutout, 2)}


def uniforms_needed(policy: Sequence[str]) -> int:
    return sum(TRANSFORMS[name][1] for name in policy)


def diffaugment(x: torch.Tensor, u: torch.Tensor, policy: Sequence[str]) -> torch.Tensor:
    """x (N, C, H, W) through the policy's transforms in order; u (N, >= uniforms_needed(policy)).

    The transforms run on one contiguous NCHW copy in float32 (or wider), and the result is
    cast back to x's dtype once: the per-pixel channel mean and the row picking are several
    times faster on NCHW than on channels_last, and D's convolutions take either layout."""
    out = x.to(torch.promote_types(x.dtype, torch.float32), memory_format=torch.contiguous_format)
    col = 0
    for name in policy:
        fn, k = TRANSFORMS[name]
        out = fn(out, u[:, col:col + k])
        col += k
    return out.to(x.dtype)


__all__ = ["TRANSFORMS", "diffaugment", "uniforms_needed"]
