"""The matmul formulation of small-grid convolutions equals the native kernels: outputs and
both gradients in float64 (to rounding), under autocast bf16 (to bf16 rounding), and inside
the models and the training step."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gan_dist.matmul_conv import MatmulConv2d, MatmulConvTranspose2d, use_matmul_convs

CASES = [  # (transposed, in, out, kernel, stride, padding, grid, bias, output_padding)
    (False, 256, 32, 4, 2, 1, (8, 8), False, 0),   # DCGAN D: 8x8 -> 4x4
    (False, 16, 1, 4, 1, 0, (4, 4), False, 0),     # DCGAN D head: 4x4 -> 1x1
    (False, 8, 12, 3, 1, 1, (5, 7), True, 0),      # non-square grid, bias
    (False, 6, 10, (3, 2), (2, 1), (1, 0), (7, 6), True, 0),
    (False, 5, 7, 4, 2, 1, (9, 9), False, 0),      # odd size: the last row and column unused
    (True, 32, 16, 4, 2, 1, (4, 4), False, 0),     # DCGAN G: 4x4 -> 8x8
    (True, 20, 24, 4, 1, 0, (1, 1), False, 0),     # DCGAN G input: z -> 4x4
    (True, 8, 6, 3, 2, 1, (3, 5), True, 1),        # output_padding, bias
    (True, 6, 4, (2, 3), (1, 2), (0, 1), (4, 3), True, 0),
]


def pair(conv_cls, matmul_cls, transposed, cin, cout, k, s, p, bias, op):
    kwargs = dict(stride=s, padding=p, bias=bias)
    if transposed:
        kwargs["output_padding"] = op
    native = conv_cls(cin, cout, k, **kwargs).double()
    fast = copy.deepcopy(native)
    fast.__class__ = matmul_cls
    return native, fast


@pytest.mark.parametrize("case", CASES, ids=[f"{'T' if c[0] else 'C'}{c[1]}-{c[2]}-k{c[3]}s{c[4]}p{c[5]}-{c[6]}"
                                             for c in CASES])
@pytest.mark.parametrize("channels_last", [False, True])
def test_outputs_and_gradients_equal_the_native_convolution(case, channels_last):
    transposed, cin, cout, k, s, p, grid, bias, op = case
    classes = (nn.ConvTranspose2d, MatmulConvTranspose2d) if transposed else (nn.Conv2d, MatmulConv2d)
    native, fast = pair(*classes, transposed, cin, cout, k, s, p, bias, op)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, cin, *grid, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = native(xa), fast(xb)
    assert ya.shape == yb.shape
    torch.testing.assert_close(yb, ya, rtol=1e-10, atol=1e-10)
    upstream = torch.randn(ya.shape, generator=g, dtype=torch.float64)
    ya.backward(upstream)
    yb.backward(upstream)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-10, atol=1e-10)
    for (name, a), b in zip(native.named_parameters(), fast.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-10, msg=name)


def test_bf16_autocast_runs_in_bf16_and_matches_to_rounding():
    native, fast = pair(nn.Conv2d, MatmulConv2d, False, 64, 32, 4, 2, 1, False, 0)
    native, fast = native.float(), fast.float()
    x = torch.randn(4, 64, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya, yb = native(x), fast(x)
    assert yb.dtype == ya.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), ya.float(), rtol=2e-2, atol=2e-2)


def test_only_small_grids_take_the_matmul_path(monkeypatch):
    from gan_dist import matmul_conv

    calls = []
    real = matmul_conv._run
    monkeypatch.setattr(matmul_conv, "_run", lambda *a: calls.append(a[1].shape) or real(*a))
    conv = nn.Conv2d(3, 4, 4, 2, 1)
    assert use_matmul_convs(nn.Sequential(conv), max_grid=16) == 1
    conv(torch.randn(1, 3, 8, 8))    # 4x4 output: 16 positions
    conv(torch.randn(1, 3, 16, 16))  # 8x8 output: native
    assert calls == [(1, 3, 8, 8)]


def test_models_and_their_state_dicts_are_unchanged_by_the_switch():
    from gan_dist.config import load_config
    from gan_dist.models import build_models

    cfg = load_config(None, ["model.resolution=64", "model.channels=3", "model.ngf=8", "model.ndf=8", "model.nz=16"])
    G, D = build_models(cfg.model, seed=3)
    G2, D2 = copy.deepcopy(G).double(), copy.deepcopy(D).double()
    G, D = G.double(), D.double()
    switched = use_matmul_convs(G2) + use_matmul_convs(D2)
    assert switched == 10  # every convolution of DCGAN-64 (each decides per call by its grid)
    assert list(G2.state_dict()) == list(G.state_dict()) and list(D2.state_dict()) == list(D.state_dict())
    z = torch.randn(5, 16, dtype=torch.float64)
    torch.testing.assert_close(D2(G2(z)), D(G(z)), rtol=1e-9, atol=1e-9)
    D2(G2(z)).sum().backward()
    D(G(z)).sum().backward()
    for a, b in zip(list(G.parameters()) + list(D.parameters()), list(G2.parameters()) + list(D2.parameters())):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("transposed", [False, True])
def test_the_output_may_be_modified_in_place(transposed):
    """ReLU(inplace=True) right after the layer (a model without normalisation)."""
    conv = (nn.ConvTranspose2d(8, 4, 4, 2, 1) if transposed else nn.Conv2d(8, 4, 4, 2, 1)).double()
    fast = copy.deepcopy(conv)
    use_matmul_convs(fast)
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    ya, yb = nn.ReLU(inplace=True)(conv(x)), nn.ReLU(inplace=True)(fast(x))
    torch.testing.assert_close(yb, ya)
    yb.sum().backward()
    assert fast.weight.grad is not None
