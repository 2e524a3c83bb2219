"""The matmul formulation of small-grid convolutions equals the native kernels: outputs and
both gradients in float64 (to rounding), second derivatives (gradgradcheck, and an R1 penalty
through the DCGAN discriminator), under autocast bf16 (to bf16 rounding), and inside the models
and the training step."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gan_dist.matmul_conv import MatmulConv2d, MatmulConvTranspose2d, use_matmul_convs
from gan_dist.models.dcgan import Discriminator, Generator

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


def uses_matmul_path(y: torch.Tensor) -> bool:
    """Whether the graph of `y` holds one of the matmul Functions (not the native kernel)."""
    seen, todo = set(), [y.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ in ("_Conv2dBackward", "_ConvTranspose2dBackward"):
            return True
        todo.extend(n for n, _ in node.next_functions)
    return False


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


@pytest.mark.parametrize("transposed", [False, True])
def test_bf16_autocast_runs_in_bf16_and_matches_to_rounding(transposed):
    classes = (nn.ConvTranspose2d, MatmulConvTranspose2d) if transposed else (nn.Conv2d, MatmulConv2d)
    native, fast = pair(*classes, transposed, 64, 32, 4, 2, 1, True, 0)
    native, fast = native.float(), fast.float()
    x = torch.randn(4, 64, *((4, 4) if transposed else (8, 8)))
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya, yb = native(xa), fast(xb)
    assert uses_matmul_path(yb)
    assert yb.dtype == ya.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), ya.float(), rtol=2e-2, atol=2e-2)
    upstream = torch.randn(ya.shape)
    ya.backward(upstream)
    yb.backward(upstream)
    assert xb.grad.dtype == torch.float32 and fast.weight.grad.dtype == torch.float32
    for a, b in [(xa.grad, xb.grad), (native.weight.grad, fast.weight.grad), (native.bias.grad, fast.bias.grad)]:
        assert (b - a).norm() <= 1e-2 * a.norm()


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
    torch.manual_seed(3)
    G, D = Generator(16, 8, 3, 64, "batch").double(), Discriminator(8, 3, 64, "batch").double()
    G2, D2 = copy.deepcopy(G), copy.deepcopy(D)
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


SMALL_CASES = [  # the geometries of CASES with few channels: numerical second derivatives stay cheap
    (False, 3, 2, 4, 2, 1, (8, 8), False, 0),
    (False, 3, 1, 4, 1, 0, (4, 4), False, 0),
    (False, 2, 3, 3, 1, 1, (5, 7), True, 0),
    (False, 2, 3, (3, 2), (2, 1), (1, 0), (7, 6), True, 0),
    (False, 2, 2, 4, 2, 1, (9, 9), True, 0),
    (True, 3, 2, 4, 2, 1, (4, 4), False, 0),
    (True, 4, 3, 4, 1, 0, (1, 1), False, 0),
    (True, 2, 3, 3, 2, 1, (3, 5), True, 1),
    (True, 2, 3, (2, 3), (1, 2), (0, 1), (4, 3), True, 0),
]


@pytest.mark.parametrize("case", SMALL_CASES, ids=[f"{'T' if c[0] else 'C'}{c[1]}-{c[2]}-k{c[3]}s{c[4]}p{c[5]}-{c[6]}"
                                                   for c in SMALL_CASES])
@pytest.mark.parametrize("channels_last", [False, True])
def test_second_derivatives_are_the_native_convolutions(case, channels_last):
    """gradgradcheck against finite differences (fast mode: along random directions), and the
    double backward of the native kernel, element by element."""
    transposed, cin, cout, k, s, p, grid, bias, op = case
    classes = (nn.ConvTranspose2d, MatmulConvTranspose2d) if transposed else (nn.Conv2d, MatmulConv2d)
    native, fast = pair(*classes, transposed, cin, cout, k, s, p, bias, op)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cin, *grid, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    names = [n for n, _ in native.named_parameters()]

    def call(module):
        return lambda x, *params: torch.func.functional_call(module, dict(zip(names, params)), (x,))

    inputs = [x.requires_grad_(True)] + [q.detach().clone().requires_grad_(True) for q in fast.parameters()]
    assert uses_matmul_path(call(fast)(*inputs))
    assert torch.autograd.gradcheck(call(fast), inputs, fast_mode=True)
    assert torch.autograd.gradgradcheck(call(fast), inputs, fast_mode=True)

    # d/d(inputs, upstream) of <first derivatives, u>, both implementations
    second = []
    for module in (native, fast):
        ins = [t.detach().clone().requires_grad_(True) for t in inputs]
        y = call(module)(*ins)
        upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64,
                               requires_grad=True)
        firsts = torch.autograd.grad(y, ins, upstream, create_graph=True)
        us = [torch.randn(f.shape, generator=torch.Generator().manual_seed(3 + i), dtype=torch.float64)
              for i, f in enumerate(firsts)]
        second.append(torch.autograd.grad(sum((f * u).sum() for f, u in zip(firsts, us)), ins + [upstream],
                                          allow_unused=True, materialize_grads=True))
    for a, b in zip(*second):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("resolution", [32, 64])
def test_r1_penalty_through_the_discriminator_gives_the_native_gradients(resolution):
    """An R1 step (logistic loss on reals + gamma/2 * ||d D(x) / d x||^2) differentiates the
    backward of every convolution: its weight gradients must be the native kernels', for every
    convolution of D."""
    torch.manual_seed(0)
    native = Discriminator(8, 3, resolution, "none").double()
    fast = copy.deepcopy(native)
    assert use_matmul_convs(fast) == (4 if resolution == 32 else 5)
    x = torch.randn(4, 3, resolution, resolution, dtype=torch.float64)
    grads = []
    for D in (native, fast):
        xi = x.clone().requires_grad_(True)
        logits = D(xi)
        if D is fast:
            assert uses_matmul_path(logits)
        grad_x, = torch.autograd.grad(logits.sum(), xi, create_graph=True)
        loss = nn.functional.softplus(-logits).mean() + 5.0 * grad_x.pow(2).flatten(1).sum(1).mean()
        loss.backward()
        grads.append({n: q.grad for n, q in D.named_parameters()})
    convs = [n for n, m in native.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == len(grads[1]) == (4 if resolution == 32 else 5)
    for name, a in grads[0].items():
        b = grads[1][name]
        assert b is not None and b.abs().sum() > 0, f"{name} got no gradient"
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12, msg=name)


def test_third_derivatives_are_the_native_convolutions():
    """The backward of the backward is again differentiable (the Functions derive each other)."""
    native, fast = pair(nn.Conv2d, MatmulConv2d, False, 2, 3, 4, 2, 1, False, 0)
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    results = []
    for conv in (native, fast):
        xi = x.clone().requires_grad_(True)
        g1, = torch.autograd.grad(conv(xi).pow(2).sum(), xi, create_graph=True)
        g2, = torch.autograd.grad(g1.pow(2).sum(), xi, create_graph=True)
        g3, = torch.autograd.grad(g2.pow(2).sum(), conv.weight)
        results.append(g3)
    torch.testing.assert_close(results[1], results[0], rtol=1e-9, atol=1e-12)
