"""2-D convolutions on small grids as one matrix multiplication (CPU speed path).

oneDNN's direct convolution kernels run far below the matmul peak when the spatial grid is
small and the channels many, as in the deep layers of DCGAN (the discriminator's 8x8 -> 4x4
convolution, the generator's 4x4 -> 8x8 transposed one): on a 2-core AMX CPU in bf16 their
backward passes took 3-4x as long as a shallow layer with the same FLOPs. Written as
im2col + GEMM, forward and both gradients of such a layer are one large matmul each plus a
gather (unfold) or a scatter-add (fold) of the small grid.

`use_matmul_convs(module, max_grid)` switches the eligible Conv2d / ConvTranspose2d layers of a
module (groups 1, dilation 1, zero padding) to this formulation for calls whose small side --
the output grid of a convolution, the input grid of a transposed one -- has at most `max_grid`
positions; other calls keep the native kernel. The layers keep their parameters, state_dict
keys and hooks. The arithmetic is the convolution's (the same sums in another order), so
results agree with the native kernels to rounding; they are deterministic on a CPU. So do the
derivatives of every order: a backward under create_graph (a gradient penalty such as R1) is
itself built from these convolutions, while a first-order backward runs its two matmuls on the
patches saved by the forward.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

Pair = tuple[int, int]


def _unfold(x: torch.Tensor, k: Pair, s: Pair, p: Pair, out: Pair) -> torch.Tensor:
    """Patches of an NHWC tensor [B, H, W, C] as rows: [B * oh * ow, kh * kw * C]."""
    B, _, _, C = x.shape
    if p[0] or p[1]:
        x = F.pad(x, (0, 0, p[1], p[1], p[0], p[0]))
    sB, sH, sW, sC = x.stride()
    view = x.as_strided((B, out[0], out[1], k[0], k[1], C), (sB, s[0] * sH, s[1] * sW, sH, sW, sC))
    return view.reshape(B * out[0] * out[1], k[0] * k[1] * C)


def _fold(cols: torch.Tensor, B: int, size: Pair, C: int, k: Pair, s: Pair, p: Pair, out: Pair) -> torch.Tensor:
    """The adjoint of `_unfold`: rows [B * oh * ow, kh * kw * C] summed back into [B, H, W, C]."""
    H, W = size  # the patches end inside the padded grid: (out - 1) * s + k <= H + 2p
    grid = cols.new_zeros(B, H + 2 * p[0], W + 2 * p[1], C)
    patches = cols.view(B, out[0], out[1], k[0], k[1], C)
    for i in range(k[0]):
        for j in range(k[1]):
            grid[:, i:i + s[0] * (out[0] - 1) + 1:s[0], j:j + s[1] * (out[1] - 1) + 1:s[1], :] += patches[:, :, :, i, j, :]
    return grid[:, p[0]:p[0] + H, p[1]:p[1] + W, :]


def _channels_last_copy(nhwc: torch.Tensor) -> torch.Tensor:
    """[B, H, W, C] as a new [B, C, H, W] tensor in channels_last memory (not a view: the
    output of a custom Function may be modified in place, e.g. by ReLU(inplace=True))."""
    B, H, W, C = nhwc.shape
    out = torch.empty((B, C, H, W), dtype=nhwc.dtype, device=nhwc.device, memory_format=torch.channels_last)
    out.permute(0, 2, 3, 1).copy_(nhwc)
    return out


def _nhwc_rows(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] (any memory format) as rows [B * H * W, C]."""
    B, C, H, W = x.shape
    return x.permute(0, 2, 3, 1).reshape(B * H * W, C)


def _no_autocast(t: torch.Tensor) -> torch.autocast:
    return torch.autocast(t.device.type, enabled=False)


# Three Functions whose derivatives are each other: the input gradient of a convolution is a
# transposed convolution with the same weight and vice versa, and both weight gradients are the
# bilinear map `_ConvWeightGrad` (patches of one tensor against rows of the other), whose own
# derivatives are again a convolution and a transposed one. A first-order backward (grad mode
# off) runs the matmuls on what the forward saved (the patches, the weight matrix); under
# create_graph it calls the Functions instead, so that derivatives of any order are the native
# convolution's (a penalty on input gradients, such as R1, differentiates the backward).
class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, stride: Pair, padding: Pair):  # noqa: ANN001, ANN205
        B, C, H, W = x.shape
        O, _, kh, kw = weight.shape
        out = ((H + 2 * padding[0] - kh) // stride[0] + 1, (W + 2 * padding[1] - kw) // stride[1] + 1)
        cols = _unfold(x.permute(0, 2, 3, 1), (kh, kw), stride, padding, out)
        wmat = weight.permute(0, 2, 3, 1).reshape(O, kh * kw * C)
        y = torch.empty((B, O, *out), dtype=cols.dtype, device=cols.device, memory_format=torch.channels_last)
        torch.mm(cols, wmat.t(), out=y.permute(0, 2, 3, 1).view(B * out[0] * out[1], O))
        ctx.save_for_backward(x, weight, cols, wmat)
        ctx.geometry = (B, C, H, W, O, (kh, kw), stride, padding, out)
        return y

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        x, weight, cols, wmat = ctx.saved_tensors
        B, C, H, W, O, k, s, p, out = ctx.geometry
        grad_x = grad_w = None
        if torch.is_grad_enabled():  # create_graph: a backward that is itself differentiable
            with _no_autocast(grad):
                if ctx.needs_input_grad[0]:
                    grad_x = _ConvTranspose2d.apply(grad, weight, s, p, (H, W))
                if ctx.needs_input_grad[1]:
                    grad_w = _ConvWeightGrad.apply(x, grad, k, s, p)
            return grad_x, grad_w, None, None
        g = _nhwc_rows(grad)
        if ctx.needs_input_grad[1]:
            grad_w = _strided_like((g.t() @ cols).view(O, k[0], k[1], C).permute(0, 3, 1, 2), weight)
        if ctx.needs_input_grad[0]:
            grad_x = _fold(g @ wmat, B, (H, W), C, k, s, p, out).permute(0, 3, 1, 2)
        return grad_x, grad_w, None, None


class _ConvTranspose2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, stride: Pair, padding: Pair, size: Pair):  # noqa: ANN001, ANN205
        B, Ci, H, W = x.shape
        _, Co, kh, kw = weight.shape
        rows = _nhwc_rows(x)
        wmat = weight.permute(0, 2, 3, 1).reshape(Ci, kh * kw * Co)
        y = _fold(rows @ wmat, B, size, Co, (kh, kw), stride, padding, (H, W))
        ctx.save_for_backward(x, weight, rows, wmat)
        ctx.geometry = (B, Ci, H, W, Co, (kh, kw), stride, padding)
        return _channels_last_copy(y)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        x, weight, rows, wmat = ctx.saved_tensors
        B, Ci, H, W, Co, k, s, p = ctx.geometry
        grad_x = grad_w = None
        if torch.is_grad_enabled():
            with _no_autocast(grad):
                if ctx.needs_input_grad[0]:
                    grad_x = _Conv2d.apply(grad, weight, s, p)
                if ctx.needs_input_grad[1]:
                    grad_w = _ConvWeightGrad.apply(grad, x, k, s, p)
            return grad_x, grad_w, None, None, None
        cols = _unfold(grad.permute(0, 2, 3, 1), k, s, p, (H, W))
        if ctx.needs_input_grad[1]:
            grad_w = _strided_like((rows.t() @ cols).view(Ci, k[0], k[1], Co).permute(0, 3, 1, 2), weight)
        if ctx.needs_input_grad[0]:
            grad_x = (cols @ wmat.t()).view(B, H, W, Ci).permute(0, 3, 1, 2)
        return grad_x, grad_w, None, None, None


class _ConvWeightGrad(torch.autograd.Function):
    """The weight gradient of a convolution of `inp` [B, C, H, W] whose output gradient is
    `gout` [B, O, oh, ow]: [O, C, kh, kw]. With the roles swapped (inp = the output gradient,
    gout = the input) it is the weight gradient of a transposed convolution."""

    @staticmethod
    def forward(ctx, inp, gout, k: Pair, stride: Pair, padding: Pair):  # noqa: ANN001, ANN205
        C, O = inp.shape[1], gout.shape[1]
        cols = _unfold(inp.permute(0, 2, 3, 1), k, stride, padding, tuple(gout.shape[2:]))
        ctx.save_for_backward(inp, gout)
        ctx.geometry = (k, stride, padding)
        return (_nhwc_rows(gout).t() @ cols).view(O, k[0], k[1], C).permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        inp, gout = ctx.saved_tensors
        k, s, p = ctx.geometry
        grad_inp = grad_gout = None
        with _no_autocast(grad):
            if ctx.needs_input_grad[0]:
                grad_inp = _ConvTranspose2d.apply(gout, grad, s, p, tuple(inp.shape[2:]))
            if ctx.needs_input_grad[1]:
                grad_gout = _Conv2d.apply(inp, grad, s, p)
        return grad_inp, grad_gout, None, None, None


def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast would run a convolution on `x` in, or None outside autocast."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def _strided_like(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`grad` with exactly `weight`'s strides. The matmul gives NHWC weight gradients; a weight
    stored NCHW (or one whose layouts differ only in a size-1 dimension, a 1-channel layer)
    would otherwise get them as they come, and DDP, whose buckets take the parameters' strides,
    warns "Grad strides do not match bucket view strides" and copies."""
    if grad.stride() == weight.stride():
        return grad
    return torch.empty_strided(weight.shape, weight.stride(), dtype=grad.dtype, device=grad.device).copy_(grad)


def _run(fn: type, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], *args) -> torch.Tensor:
    dtype = _autocast_dtype(x)
    if dtype is not None:
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    with torch.autocast(x.device.type, enabled=False):
        y = fn.apply(x, weight, *args)
        if bias is not None:
            y = y + bias.view(1, -1, 1, 1)
    return y


class MatmulConv2d(nn.Conv2d):
    """nn.Conv2d whose calls on small output grids run as one matmul (see the module docstring)."""

    max_grid = 64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            return super().forward(x)
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        oh = (x.shape[2] + 2 * ph - kh) // sh + 1
        ow = (x.shape[3] + 2 * pw - kw) // sw + 1
        if oh * ow > self.max_grid:
            return super().forward(x)
        return _run(_Conv2d, x, self.weight, self.bias, self.stride, self.padding)


class MatmulConvTranspose2d(nn.ConvTranspose2d):
    """nn.ConvTranspose2d whose calls on small input grids run as one matmul."""

    max_grid = 64

    def forward(self, x: torch.Tensor, output_size: Optional[list[int]] = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[2] * x.shape[3] > self.max_grid:
            return super().forward(x, output_size)
        output_padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size,
                                              2, self.dilation)
        size = tuple((n - 1) * s - 2 * p + k + op for n, s, p, k, op in
                     zip(x.shape[2:], self.stride, self.padding, self.kernel_size, output_padding))
        return _run(_ConvTranspose2d, x, self.weight, self.bias, self.stride, self.padding, size)


def _eligible(m: nn.Module) -> bool:
    return (type(m) in (nn.Conv2d, nn.ConvTranspose2d) and m.groups == 1 and m.dilation == (1, 1)
            and m.padding_mode == "zeros" and not isinstance(m.padding, str))


def use_matmul_convs(module: nn.Module, max_grid: int = 64) -> int:
    """Switch the eligible convolutions of `module` in place; returns how many were switched."""
    count = 0
    for m in module.modules():
        if _eligible(m):
            m.__class__ = MatmulConv2d if isinstance(m, nn.Conv2d) else MatmulConvTranspose2d
            m.max_grid = max_grid
            count += 1
    return count
