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

TRANSLATION_RATIO = 0.125
CUTOUT_RATIO = 0.5


def _col(u: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
    """Column i of the draws as (N, 1, 1, 1) in the images' dtype."""
    return u[:, i].to(x.dtype).view(-1, 1, 1, 1)


def color(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    x = x + (_col(u, 0, x) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_col(u, 1, x) * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_col(u, 2, x) + 0.5) + mean


def _shift_index(size: int, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, size) source positions of a shift by `shift` (N,) and whether they lie inside."""
    src = torch.arange(size, device=shift.device).view(1, -1) - shift.view(-1, 1)
    inside = (src >= 0) & (src < size)
    return src.clamp(0, size - 1), inside


def translation(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    N, _, H, W = x.shape
    sh, sw = int(H * TRANSLATION_RATIO + 0.5), int(W * TRANSLATION_RATIO + 0.5)
    # a uniform integer in [-s, s]; (2s + 1) * u < 2s + 1 always
    dy = (u[:, 0] * (2 * sh + 1)).floor().long() - sh
    dx = (u[:, 1] * (2 * sw + 1)).floor().long() - sw
    rows, in_r = _shift_index(H, dy)
    cols, in_c = _shift_index(W, dx)
    n = torch.arange(N, device=x.device).view(-1, 1, 1)
    out = x.permute(0, 2, 3, 1)[n, rows.view(N, H, 1), cols.view(N, 1, W)]  # (N, H, W, C)
    mask = (in_r.view(N, H, 1) & in_c.view(N, 1, W)).unsqueeze(1).to(x.dtype)
    return out.permute(0, 3, 1, 2) * mask


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
    keep = ~(in_r.view(N, 1, H, 1) & in_c.view(N, 1, 1, W))
    return x * keep.to(x.dtype)


# name -> (transform, uniform numbers it takes per sample)
TRANSFORMS: dict[str, tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], int]] = {
    "color": (color, 3), "translation": (translation, 2), "cutout": (cutout, 2)}


def uniforms_needed(policy: Sequence[str]) -> int:
    return sum(TRANSFORMS[name][1] for name in policy)


def diffaugment(x: torch.Tensor, u: torch.Tensor, policy: Sequence[str]) -> torch.Tensor:
    """x (N, C, H, W) through the policy's transforms in order; u (N, >= uniforms_needed(policy))."""
    col = 0
    for name in policy:
        fn, k = TRANSFORMS[name]
        x = fn(x, u[:, col:col + k])
        col += k
    return x


__all__ = ["TRANSFORMS", "diffaugment", "uniforms_needed"]
