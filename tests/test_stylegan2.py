"""StyleGAN2 (gan_dist/models/stylegan2): sizes derived from the architecture, the per-sample
draws, path length, bad settings, and exactness under every strategy through all four phases
(Dmain, Dreg, Gmain, Greg) with real gloo processes."""
from __future__ import annotations

import math

import pytest
import torch

from gan_dist import rng
from gan_dist.config import ConfigError, load_config
from gan_dist.models import model_spec
from tests.test_recipe_exact import STRATEGIES, job  # the 2-process jobs and the strategies they cover
from tests.workers.sharded_worker import STYLEGAN2_TINY

TINY = ["model.arch=stylegan2", *STYLEGAN2_TINY]


def cfg_of(*overrides: str):
    return load_config(None, list(overrides))


# ---- sizes ----------------------------------------------------------------------------------
def expected_counts(R: int, C: int, z: int, w: int, layers: int, base: int, cmax: int, K: int = 0) -> dict[str, int]:
    """Parameters of StyleGAN2 config F, counted from the architecture (Karras et al. 2020, and
    stylegan2-ada-pytorch's networks.py): every FC layer has in*out weights + out biases; a
    synthesis layer is an affine FC (w -> in, its biases initialised to 1), a 3x3 weight
    out*in*9, one noise strength and out biases; toRGB is an affine FC (w -> in) + a 1x1 weight
    C*in + C biases; the 4x4 block starts from a learned const ch(4)*4*4 and has one conv; D's
    residual blocks have conv0 (3x3, tmp->tmp, bias), conv1 (3x3, tmp->out, bias), a bias-free
    1x1 skip (tmp->out) and, at the input resolution, fromRGB (1x1, C->tmp, bias); D's epilogue
    has a 3x3 conv over ch(4)+1 maps (the minibatch std), an FC ch(4)*16 -> ch(4) and an FC
    ch(4) -> 1.

    Conditional (K classes): G's mapping embeds the one-hot label with an FC K -> w and its first
    layer takes z and the embedding (z + w -> w); D has a label mapping network of its own (an FC
    K -> cmap, then 8 FC layers cmap -> cmap, cmap = ch(4); 8 whatever G's depth, as the
    reference's D takes no mapping depth) and its last FC has cmap outputs instead of 1."""
    ch = lambda r: min(base // r, cmax)  # noqa: E731
    fc = lambda i, o: i * o + o  # noqa: E731
    mapping = fc(z + (w if K else 0), w) + (layers - 1) * fc(w, w) + (fc(K, w) if K else 0)
    syn_layer = lambda i, o: fc(w, i) + o * i * 9 + 1 + o  # noqa: E731
    torgb = lambda i: fc(w, i) + C * i + C  # noqa: E731
    log2 = int(math.log2(R))
    g = mapping + ch(4) * 16 + syn_layer(ch(4), ch(4)) + torgb(ch(4))
    for r in (2 ** k for k in range(3, log2 + 1)):
        g += syn_layer(ch(r // 2), ch(r)) + syn_layer(ch(r), ch(r)) + torgb(ch(r))
    d = C * ch(R) + ch(R)  # fromRGB
    for r in (2 ** k for k in range(3, log2 + 1)):
        tmp, out = ch(r), ch(r // 2)
        d += (tmp * tmp * 9 + tmp) + (out * tmp * 9 + out) + out * tmp
    c4 = ch(4)
    d += ((c4 + 1) * c4 * 9 + c4) + fc(c4 * 16, c4) + fc(c4, c4 if K else 1)
    if K:
        d += fc(K, c4) + 8 * fc(c4, c4)
    return {"G": g, "D": d}


# stylegan2-ada-pytorch at d72cc7d (training.networks.Generator/Discriminator, instantiated outside
# this repository; the conditional one as its cifar setting: c_dim=10, G's mapping depth 2) has
# these counts; the formula above must give them too. Key: (preset, resolution, G's mapping depth,
# classes).
REFERENCE_COUNTS = {("stylegan2", 1024, 8, 0): {"G": 30370060, "D": 29012513},
                    ("paper256", 256, 8, 0): {"G": 24767458, "D": 24001089},
                    ("stylegan2", 32, 2, 10): {"G": 20215315, "D": 23876096}}


@pytest.mark.parametrize("preset,R,layers,K", list(REFERENCE_COUNTS))
def test_parameter_counts_follow_from_the_architecture(preset, R, layers, K):
    cfg = cfg_of("model.arch=stylegan2", f"model.resolution={R}", "model.channels=3",
                 f"model.stylegan2.preset={preset}", f"model.stylegan2.mapping_layers={layers}",
                 f"model.num_classes={K}")
    spec = model_spec(cfg.model)
    with torch.device("meta"):
        G, D = spec.make_generator(), spec.make_discriminator()
    base = {"stylegan2": 32768, "paper256": 16384}[preset]
    expected = expected_counts(R, 3, 512, 512, layers, base, 512, K)
    assert expected == REFERENCE_COUNTS[(preset, R, layers, K)]
    assert spec.param_counts(G, D) == expected


@pytest.mark.parametrize("K", [0, 5])
def test_tiny_counts_follow_from_the_architecture(K):
    spec = model_spec(cfg_of(*TINY, f"model.num_classes={K}").model)
    G, D = spec.build(0)
    assert spec.param_counts(G, D) == expected_counts(32, 1, 16, 16, 2, 256, 16, K)


# ---- conditional ----------------------------------------------------------------------------
def test_conditional_networks_use_the_label():
    spec = model_spec(cfg_of(*TINY, "model.num_classes=4").model)
    G, D = spec.build(0)
    assert spec.num_classes == 4
    G.eval()
    z = torch.randn(4, 16)
    zero, one = torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long)
    x0, x1 = G(z, zero), G(z, one)
    assert (x0 - x1).abs().max() > 1e-3
    # the label's embedding is normalised and joins z: w = mapping([z / rms(z), e / rms(e)])
    from gan_dist.models.stylegan2.networks import normalize_2nd_moment
    e = G.mapping.embed(torch.nn.functional.one_hot(one, 4).float())
    x = torch.cat([normalize_2nd_moment(z), normalize_2nd_moment(e)], dim=1)
    for layer in G.mapping.layers:
        x = layer(x)
    torch.testing.assert_close(G.mapping(z, one)[:, 0], x)
    # D: the projection of the last features onto the mapped label, over sqrt(cmap_dim)
    d0 = D(x0, zero)
    feats = D.epilogue.fc(D.epilogue.conv(D.epilogue.mbstd(_d_blocks(D, x0))).flatten(1))
    proj = (D.epilogue.out(feats) * D.mapping(None, zero)).sum(dim=1, keepdim=True) / math.sqrt(16)
    torch.testing.assert_close(d0, proj)
    assert d0.shape == (4, 1) and (d0 - D(x0, one)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="conditional"):
        G(z)
    with pytest.raises(ValueError, match="conditional"):
        D(x0)
    plain = model_spec(cfg_of(*TINY).model)  # unconditional: the parameter names of before
    G0, D0 = plain.build(0)
    assert not any("embed" in k for k in G0.state_dict()) and D0.mapping is None


def _d_blocks(D, x):
    for block in D.blocks:
        x = block(x)
    return x


def test_conditional_truncation_uses_the_one_tracked_average():
    """As the reference: one w average over every class, so psi 0 gives one image for every label."""
    spec = model_spec(cfg_of(*TINY, "model.num_classes=4").model)
    G, _ = spec.build(0)
    G.train()
    G.mapping(torch.randn(64, 16), torch.arange(64) % 4)
    assert G.mapping.w_avg.abs().sum() > 0
    G.eval()
    images = G(torch.randn(4, 16), torch.arange(4), truncation_psi=0.0)
    assert torch.allclose(images, images[:1].expand_as(images), atol=1e-6)


# ---- networks and draws ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    spec = model_spec(cfg_of(*TINY).model)
    G, D = spec.build(0)
    return spec, G, D


def test_draws_depend_on_the_sample_index_only(tiny):
    spec, G, _ = tiny
    whole = spec.draw_g_inputs(7, range(100, 108), "cpu")
    halves = [spec.draw_g_inputs(7, range(lo, lo + 4), "cpu") for lo in (100, 104)]
    assert torch.equal(torch.cat([h["mix_z"] for h in halves]), whole["mix_z"])
    assert torch.equal(torch.cat([h["mix_cutoff"] for h in halves]), whole["mix_cutoff"])
    assert halves[0]["noise_seeds"] + halves[1]["noise_seeds"] == whole["noise_seeds"]
    z = rng.randn_by_index(7, rng.Z, range(100, 108), (16,))
    out = G(z, None, **whole)
    parts = [G(z[i:i + 4], None, **halves[i // 4]) for i in (0, 4)]
    torch.testing.assert_close(torch.cat(parts), out, rtol=0, atol=1e-6)
    assert not torch.equal(out, G(z, None, **spec.draw_g_inputs(8, range(100, 108), "cpu")))


def test_style_mixing_share_and_cutoffs(tiny):
    spec, G, _ = tiny
    cut = spec.draw_g_inputs(0, range(4000), "cpu")["mix_cutoff"]
    mixed = cut < G.num_ws
    assert 0.87 < mixed.float().mean().item() < 0.93  # style_mixing=0.9
    assert cut.min().item() == 1 and set(cut[mixed].tolist()) == set(range(1, G.num_ws))


def test_mixing_takes_the_second_latents_w_from_the_cutoff(tiny):
    _, G, _ = tiny
    G.eval()
    try:
        z, z2 = torch.randn(2, 16), torch.randn(2, 16)
        cutoff = torch.tensor([3, G.num_ws])
        _, ws = G(z, None, mix_z=z2, mix_cutoff=cutoff, noise_mode="const", return_ws=True)
        w1, w2 = G.mapping(z), G.mapping(z2)
        assert torch.equal(ws[0, :3], w1[0, :3]) and torch.equal(ws[0, 3:], w2[0, 3:])
        assert torch.equal(ws[1], w1[1])
    finally:
        G.train()


def test_noise_inputs_and_modes(tiny):
    _, G, _ = tiny
    G.eval()
    try:
        with torch.no_grad():
            for layer in G.modules():  # noise matters only with a strength
                if hasattr(layer, "noise_strength"):
                    layer.noise_strength.fill_(0.5)
            z = torch.randn(2, 16)
            a, b = G(z, None, noise_seeds=(1, 2)), G(z, None, noise_seeds=(1, 2))
            assert torch.equal(a, b)
            assert not torch.equal(a, G(z, None, noise_seeds=(1, 3)))
            assert torch.equal(a[0], G(z, None, noise_seeds=(1, 3))[0])
            assert torch.equal(G(z, None, noise_mode="const"), G(z, None, noise_mode="const"))
            assert torch.equal(G(z), G(z, noise_mode="const"))  # eval mode: a function of z
            assert not torch.equal(G(z, noise_mode="random"), G(z, noise_mode="random"))  # global RNG
            G.train()
            assert not torch.equal(G(z), G(z))  # training mode: 'random'
    finally:
        with torch.no_grad():
            for layer in G.modules():
                if hasattr(layer, "noise_strength"):
                    layer.noise_strength.zero_()
        G.train()


def test_truncation_pulls_toward_the_tracked_average(tiny):
    _, G, _ = tiny
    z = torch.randn(64, 16)
    before = G.mapping.w_avg.clone()
    G.train()
    G.mapping(z)
    assert not torch.equal(G.mapping.w_avg, before)  # tracked in training mode
    G.eval()
    try:
        avg = G.mapping.w_avg.clone()
        w = G.mapping(z)
        assert torch.equal(G.mapping.w_avg, avg)  # not in eval mode
        torch.testing.assert_close(G.mapping(z, truncation_psi=0.0), avg.expand_as(w))
        torch.testing.assert_close(G.mapping(z, truncation_psi=0.7), avg + 0.7 * (w - avg))
        G.truncation_psi = 0.0  # the default of G's forward (generate --truncation)
        images = G(z[:4])
        assert torch.allclose(images, images[:1].expand_as(images), atol=1e-6)  # every w is the average
        assert not torch.allclose(G(z[:4], truncation_psi=1.0), images)
    finally:
        G.truncation_psi = 1.0
        G.train()


def _upfirdn(x: torch.Tensor, up: int, down: int, pad: tuple[int, int], gain: float) -> torch.Tensor:
    """The definition: zero insertion, zero padding (before, after), the 4x4 [1,3,3,1] kernel
    (normalised, times gain) on every channel, every `down`-th pixel kept."""
    f = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=x.dtype)
    k = torch.outer(f, f) / 64 * gain
    N, C, H, W = x.shape
    if up > 1:
        z = x.new_zeros(N, C, H * up, W * up)
        z[:, :, ::up, ::up] = x
        x = z
    x = torch.nn.functional.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    y = torch.nn.functional.conv2d(x.reshape(N * C, 1, *x.shape[2:]), k[None, None])
    return y.reshape(N, C, *y.shape[2:])[:, :, ::down, ::down]


@pytest.mark.parametrize("H,W", [(8, 8), (4, 4), (32, 32), (16, 8)])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_fir_resampling_matches_its_definition(H, W, layout):
    from gan_dist.models.stylegan2.networks import FIRFilter

    fir, x = FIRFilter(), torch.randn(2, 3, H, W, dtype=torch.float64)
    if layout == "nhwc":  # the depthwise-convolution path
        x = x.contiguous(memory_format=torch.channels_last)
        assert fir.pad(x, 1).is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fir.up2(x), _upfirdn(x, 2, 1, (2, 1), 4.0))
    torch.testing.assert_close(fir.pad(x, 1), _upfirdn(x, 1, 1, (1, 1), 1.0))
    torch.testing.assert_close(fir.pad(x, 2), _upfirdn(x, 1, 1, (2, 2), 1.0))
    torch.testing.assert_close(fir.down2(x), _upfirdn(x, 1, 2, (1, 1), 1.0))
    f32 = x.float()  # the cached matrices follow the input's dtype
    torch.testing.assert_close(fir.pad(f32, 2), _upfirdn(f32, 1, 1, (2, 2), 1.0))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_fir_resampling_gradients_of_first_and_second_order(layout):
    from gan_dist.models.stylegan2.networks import FIRFilter

    fir = FIRFilter()
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    for fn in (fir.up2, lambda t: fir.pad(t, 1), lambda t: fir.pad(t, 2), fir.down2):
        assert torch.autograd.gradcheck(lambda t: fn(t).square(), (x,))
        assert torch.autograd.gradgradcheck(lambda t: fn(t).square(), (x,))


def test_clamp_skipped_in_range_gives_the_clamps_values_and_gradients():
    from gan_dist.models.stylegan2.networks import bias_act

    b = torch.randn(4)
    for scale in (1.0, 100.0):  # all within +-256 (the clamp would change nothing), and partly beyond
        x = (torch.randn(3, 4, 5, 5, dtype=torch.float64) * scale).requires_grad_()
        ours = bias_act(x, b.double(), lrelu=True, gain=1.0, clamp=256.0)
        ref = (torch.nn.functional.leaky_relu(x + b.double().reshape(1, -1, 1, 1), 0.2) * math.sqrt(2)).clamp(-256, 256)
        assert torch.equal(ours, ref)
        y = torch.randn_like(ours)
        g_ours, = torch.autograd.grad((ours * y).sum(), x, create_graph=True)
        g_ref, = torch.autograd.grad((ref * y).sum(), x, create_graph=True)
        assert torch.equal(g_ours, g_ref)
        assert (scale > 1) == bool((ours.abs() == 256).any())  # the second case does clamp


def test_cpu_nhwc_layout_equals_the_nchw_path(tiny, monkeypatch):
    """On a CPU the convolutions (and the FIR filters after them) run NHWC: G's and D's outputs,
    their parameter gradients and an R1-style double backward equal the plain NCHW path's."""
    import gan_dist.models.stylegan2.networks as networks

    spec, G, D = tiny
    gen = torch.Generator().manual_seed(0)
    z, real = torch.randn(8, 16, generator=gen), torch.randn(8, 1, 32, 32, generator=gen)

    def run():
        G.zero_grad(), D.zero_grad()
        img = G(z, noise_seeds=tuple(range(8)))
        x = real.clone().requires_grad_()
        logits = D(img) + D(x)
        grad, = torch.autograd.grad(logits.sum(), x, create_graph=True)
        (logits.mean() + grad.square().sum()).backward()
        return img.detach(), {n: p.grad.clone() for n, p in [*G.named_parameters(), *D.named_parameters()]}

    nhwc_img, nhwc_grads = run()
    monkeypatch.setattr(networks, "_layout", lambda t: t)
    nchw_img, nchw_grads = run()
    torch.testing.assert_close(nhwc_img, nchw_img, rtol=1e-4, atol=1e-5)
    for name, g in nchw_grads.items():
        # float32 sums in another order: a weight gradient summed over every pixel of a second
        # order term cancels down to a small fraction of its terms, so the tolerance is relative
        # to the tensor's largest entry, not to each element
        scale = g.abs().max().item()
        torch.testing.assert_close(nhwc_grads[name], g, rtol=1e-4, atol=max(1e-5, 2e-3 * scale),
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("lrelu,lr_mult", [(False, 1.0), (True, 0.01)])
def test_fully_connected_is_the_equalised_lr_affine_map(lrelu, lr_mult):
    """y = x (lr_mult W / sqrt(in))^T + lr_mult b [then leaky ReLU 0.2 times sqrt 2], written out
    in float64 from the definition."""
    from gan_dist.models.stylegan2.networks import FullyConnected

    fc = FullyConnected(24, 5, lrelu=lrelu, lr_mult=lr_mult)
    with torch.no_grad():
        fc.bias.normal_()
    x = torch.randn(7, 24)
    W, b, xd = fc.weight.double(), fc.bias.double(), x.double()
    want = torch.stack([torch.stack([(xd[n] * W[o]).sum() * lr_mult / math.sqrt(24) + b[o] * lr_mult
                                     for o in range(5)]) for n in range(7)])
    if lrelu:
        want = torch.where(want >= 0, want, 0.2 * want) * math.sqrt(2)
    torch.testing.assert_close(fc(x).double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_weight_gradients_are_laid_out_as_the_weights(precision):
    """Every parameter's gradient has the parameter's own strides, after a first-order backward
    and after R1's and path length's double backwards (first- plus second-order terms), so that
    DDP's gradient buckets (views with the parameters' strides) take them without "Grad strides
    do not match bucket view strides". The cases that broke: D's [1, n] output layer after R1
    (gradient strides (1, 1)) and 1x1 convolutions (skip, toRGB) on NHWC activations."""
    spec = model_spec(cfg_of(*TINY, "model.num_classes=3").model)
    G, D = spec.build(0)
    c = torch.arange(4) % 3

    def bad(module):
        return [(n, tuple(p.stride()), tuple(p.grad.stride())) for n, p in module.named_parameters()
                if p.grad is not None and p.grad.stride() != p.stride()]

    for second_order in (False, True):
        G.zero_grad(set_to_none=True), D.zero_grad(set_to_none=True)
        x = torch.randn(4, 1, 32, 32, requires_grad=second_order)
        delta = torch.zeros(4, G.num_ws, G.w_dim, requires_grad=second_order)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = D(x, c).float()
            img = G(torch.randn(4, G.z_dim), c, ws_delta=delta, noise_seeds=tuple(range(4))).float()
        loss_d, loss_g = logits.sum(), (img * torch.randn_like(img)).sum()
        if second_order:  # as Dreg and Greg: the penalty plus the outputs times zero
            gx, = torch.autograd.grad(loss_d, x, create_graph=True)
            gw, = torch.autograd.grad(loss_g, delta, create_graph=True)
            loss_d, loss_g = gx.square().sum() + logits.sum() * 0, gw.square().sum() + img.sum() * 0
        (loss_d + loss_g).backward()
        assert bad(D) == [] and bad(G) == [], (second_order, bad(D), bad(G))
        assert all(p.grad is not None for p in D.parameters())


def test_minibatch_std_groups_consecutive_samples(tiny):
    _, _, D = tiny
    x = torch.randn(8, 1, 32, 32)
    out = D(x)
    torch.testing.assert_close(torch.cat([D(x[:4]), D(x[4:])]), out)
    with pytest.raises(ValueError, match="mbstd_group"):
        D(x[:6])


def test_path_length_term_and_its_state(tiny):
    from gan_dist.loop import Batch
    from gan_dist.models.stylegan2 import PathLength

    spec, G, _ = tiny

    class Plain:  # the strategy's part in a penalty: call G, take the input gradient
        def __init__(self):
            self.G = G

        def input_grad(self, output, inputs, trained):
            return torch.autograd.grad(output, inputs, create_graph=True)[0]

    b = Batch(real=torch.zeros(8, 1, 32, 32), z=torch.randn(8, 16), g_inputs=spec.draw_g_inputs(0, range(8), "cpu"))
    term = PathLength(16, 16, G.num_ws, 0.9, weight=2.0, decay=0.01, shrink=2)
    loss, stats = term(Plain(), b)
    assert stats["pl/mean"].item() > 0 and stats["loss/pl"].item() > 0
    G.zero_grad()
    loss.backward()
    assert all(p.grad is not None for p in G.parameters())
    assert G.mapping.layers[0].weight.grad.abs().sum() > 0  # through the Jacobian's dependence on w
    restored = PathLength(16, 16, G.num_ws, 0.9, 2.0, 0.01, 2)
    restored.load_state_dict(term.state_dict())
    assert torch.equal(restored.mean, term.mean)


def test_greg_phase_in_the_recipe():
    from gan_dist.recipe import build_recipe

    cfg = cfg_of(*TINY, "reg.r1_gamma=10", "reg.d_every=16")
    spec = model_spec(cfg.model)
    recipe = build_recipe(cfg, spec)
    phases = {p.name: p for p in recipe.phases}
    assert list(phases) == ["Dmain", "Dreg", "Gmain", "Greg"]
    greg = phases["Greg"]
    assert (greg.trains, greg.terms, greg.every, greg.weight, greg.double_backward) == ("G", ("pl",), 4, 4.0, True)
    assert recipe.reg_interval("G") == 4 and recipe.reg_interval("D") == 16
    no_pl = cfg_of(*TINY, "model.stylegan2.pl_weight=0")
    off = build_recipe(no_pl, model_spec(no_pl.model))
    assert [p.name for p in off.phases] == ["Dmain", "Gmain"]


@pytest.mark.parametrize("override,key", [
    ("model.resolution=48", "model.resolution"), ("model.resolution=16", "model.resolution"),
    ("model.resolution=2048", "model.resolution"), ("model.stylegan2.channel_base=16", "model.stylegan2.channel_base"),
    ("model.stylegan2.channel_max=0", "model.stylegan2.channel_max"),
    ("model.stylegan2.preset=paper512", "model.stylegan2.preset"),
    ("model.stylegan2.style_mixing=1.5", "model.stylegan2.style_mixing"),
    ("model.num_classes=-1", "model.num_classes")])
def test_bad_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cfg_of(*TINY, override)


def test_preset_none_needs_every_size():
    with pytest.raises(ConfigError, match=r"model\.stylegan2\.channel_base is unset"):
        cfg_of("model.arch=stylegan2", "model.resolution=32", "model.channels=1", "model.stylegan2.preset=none")


# ---- exactness under every strategy (multi-process) -----------------------------------------
# 3 iterations: Dreg (R1) and Greg (path length) due at iterations 0 and 2
EXACT = ("--model", "stylegan2", "--global-batch", "8", "--iters", "3", "--r1", "10", "--d-every", "2",
         "--pl-every", "2")
def assert_same(a: dict, b: dict) -> None:
    for model in ("G", "D"):
        assert a[model].keys() == b[model].keys()
        for key, value in a[model].items():
            torch.testing.assert_close(value, b[model][key], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{model}.{key}: {m}")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    return job(tmp_path_factory.mktemp("sg2-one"), "one", 1, "--strategy", "none", *EXACT)[0]


@pytest.mark.multiproc
@pytest.mark.timeout(1800)
def test_the_regularisers_change_the_weights(tmp_path, one_process):
    """The comparisons below would prove little if R1 and path length had no effect."""
    plain = job(tmp_path, "plain", 1, "--strategy", "none", "--model", "stylegan2", "--global-batch", "8",
                "--iters", "3", "--pl-weight", "0")[0]
    for model in ("G", "D"):
        diff = max((plain[model][k] - one_process[model][k]).abs().max().item()
                   for k in plain[model] if plain[model][k].is_floating_point())
        assert diff > 1e-4, f"the regularisers hardly changed {model} ({diff})"
    assert all(torch.isfinite(v).all() for m in ("G", "D") for v in one_process[m].values())


@pytest.mark.multiproc
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_two_processes_equal_one_with_the_whole_batch(tmp_path, one_process, name):
    r0, _ = job(tmp_path, name, 2, *STRATEGIES[name], *EXACT)
    assert_same(r0, one_process)


# ---- sampling -------------------------------------------------------------------------------
def _generate(tmp_path, ckpt, out: str, *extra: str):
    from tests._mp import PYTHON, run

    return run([PYTHON, "-m", "gan_dist.generate", "--ckpt", str(ckpt), "--n", "4", "--out", str(tmp_path / out),
                *extra], cwd=tmp_path, timeout=300, check=False)


def test_generate_truncation(tmp_path):
    from PIL import Image

    from gan_dist.config import to_yaml

    cfg = cfg_of(*TINY)
    G, _ = model_spec(cfg.model).build(0)
    with torch.no_grad():
        G.mapping.w_avg.normal_()  # an average w away from zero, as after training
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    torch.save(G.state_dict(), tmp_path / "generator.pt")
    images = {}
    for psi in ("1", "0"):
        r = _generate(tmp_path, tmp_path / "generator.pt", f"psi{psi}", "--truncation", psi)
        assert r.returncode == 0, r.stderr
        images[psi] = [torch.tensor(list(Image.open(p).getdata()))
                       for p in sorted((tmp_path / f"psi{psi}").glob("*.png"))]
    assert len(images["0"]) == 4 and all(torch.equal(i, images["0"][0]) for i in images["0"])  # all the average
    assert not all(torch.equal(i, images["1"][0]) for i in images["1"])
    r = _generate(tmp_path, tmp_path / "generator.pt", "bad", "--truncation", "1.5")
    assert r.returncode == 2 and "--truncation=1.5 must be in [0, 1]" in r.stderr, r.stderr


def test_generate_truncation_of_a_family_without_it_names_both(tmp_path):
    from gan_dist.config import to_yaml

    cfg = cfg_of("model.arch=dcgan", "model.resolution=32", "model.channels=1", "model.dcgan.ngf=8",
                 "model.dcgan.ndf=8", "model.dcgan.nz=16")
    G, _ = model_spec(cfg.model).build(0)
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    torch.save(G.state_dict(), tmp_path / "generator.pt")
    r = _generate(tmp_path, tmp_path / "generator.pt", "out", "--truncation", "0.7")
    assert r.returncode == 2 and "model.arch=dcgan has no truncation" in r.stderr, r.stderr


DCGAN_SMALL = ["model.arch=dcgan", "model.resolution=32", "model.channels=1", "model.dcgan.ngf=8", "model.dcgan.ndf=8",
               "model.dcgan.nz=16"]


@pytest.mark.parametrize("weights,config", [("stylegan2", "dcgan"), ("dcgan", "stylegan2")])
def test_generate_with_another_familys_config_names_both(tmp_path, weights, config):
    """generator.pt of one family next to the config.yaml of another: exit 2 naming both families."""
    from gan_dist.config import to_yaml

    of = {"stylegan2": TINY, "dcgan": DCGAN_SMALL}
    G, _ = model_spec(cfg_of(*of[weights]).model).build(0)
    torch.save(G.state_dict(), tmp_path / "generator.pt")
    (tmp_path / "config.yaml").write_text(to_yaml(cfg_of(*of[config])))
    r = _generate(tmp_path, tmp_path / "generator.pt", "out.png")
    assert r.returncode == 2, r.stderr
    assert f"model.arch={weights} generator" in r.stderr and f"says model.arch={config}" in r.stderr, r.stderr
    assert not (tmp_path / "out.png").exists()
