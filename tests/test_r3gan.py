"""R3GAN (model.arch=r3gan): the reference's sizes, every preset's recipe on a CPU, and exact
distributed training with R1 + R2 in every D step under every strategy."""
from __future__ import annotations

import math

import pytest
import torch

from gan_dist.build import setup_models, step_batches
from gan_dist.config import ConfigError, load_config
from gan_dist.distributed import DistInfo
from gan_dist.loop import train_step
from gan_dist.models import build_models, model_spec
from gan_dist.models.r3gan import PRESETS
from gan_dist.parallel import build_strategy
from gan_dist.schedules import Schedules
from tests._mp import REPO

INFO = DistInfo(0, 1, 0, 1, 0, torch.device("cpu"), None, "python")
RESOLUTION = {"cifar10": 32, "ffhq64": 64, "ffhq256": 256, "imagenet32": 32, "imagenet64": 64}


# ---- sizes ------------------------------------------------------------------------------------
def block_params(c: int, groups: int, e: int, k: int = 3) -> int:
    """1x1 c -> e*c, grouped kxk e*c -> e*c, 1x1 e*c -> c (no biases), two activation biases."""
    inner = e * c
    return c * inner + inner * (inner // groups) * k * k + inner * c + 2 * inner


def expected_counts(widths, cards, blocks, e, z, channels=3, classes=0) -> dict[str, int]:
    """G and D's parameters from the architecture: bases, blocks, width changes, image layers, embeddings."""
    stages = sum(n * block_params(w, g, e) for w, g, n in zip(widths, cards, blocks))
    changes = sum(a * b for a, b in zip(widths, widths[1:]) if a != b)  # one 1x1 per width change
    g_embed = z if classes else 0
    G = (widths[0] * 16 + (z + g_embed) * widths[0]  # 4x4 basis and the linear map of [z, embed(c)]
         + stages + changes + widths[-1] * channels + classes * g_embed)
    d_out = widths[0] if classes else 1  # D's 4x4 stage: depthwise 4x4, linear to the logit (or embedding)
    D = (channels * widths[-1] + stages + changes + widths[0] * 16 + widths[0] * d_out + classes * d_out)
    return {"G": G, "D": D}


# brownvc/R3GAN at 19a7ddf463fbac2bd39b4c1c73d63f1c441c7403: sum of parameters of
# training.networks.Generator / Discriminator built with train.py's preset arguments
# (c_dim 0, or 10 with its ConditionEmbeddingDimension), counted in a separate process
REFERENCE = {("cifar10", 0): {"G": 20732160, "D": 20683776},
             ("cifar10", 10): {"G": 20781952, "D": 21280512},
             ("ffhq256", 0): {"G": 23057952, "D": 23009568}}


def r3gan_cfg(preset: str, *more: str):
    return load_config(None, ["model.arch=r3gan", f"model.r3gan.preset={preset}",
                              f"model.resolution={RESOLUTION.get(preset, 32)}", "model.channels=3", *more])


@pytest.mark.parametrize("preset,classes", list(REFERENCE))
def test_sizes_follow_the_architecture_and_equal_the_reference(preset, classes):
    cfg = r3gan_cfg(preset, f"model.num_classes={classes}")
    spec = model_spec(cfg.model)
    got = spec.param_counts(spec.make_generator(), spec.make_discriminator())
    p = PRESETS[preset]
    assert got == expected_counts(p.widths, p.cardinalities, p.blocks, p.expansion, p.z_dim, 3, classes)
    assert got == REFERENCE[(preset, classes)]


def test_overrides_change_the_sizes_as_the_formula_says():
    cfg = r3gan_cfg("tiny", "model.r3gan.widths=[32,16,16,8]", "model.r3gan.cardinalities=[8,4,4,2]",
                    "model.r3gan.blocks=[1,2,0,1]", "model.r3gan.expansion=3", "model.channels=1")
    G, D = build_models(cfg.model, seed=0)
    counts = {"G": sum(p.numel() for p in G.parameters()), "D": sum(p.numel() for p in D.parameters())}
    assert counts == expected_counts([32, 16, 16, 8], [8, 4, 4, 2], [1, 2, 0, 1], 3, 16, channels=1)
    assert G(torch.randn(2, 16)).shape == (2, 1, 32, 32)
    assert D(torch.randn(2, 1, 32, 32)).shape == (2,)


def test_bad_settings_name_the_key():
    with pytest.raises(ConfigError, match="cifar10, ffhq64, ffhq256, imagenet32, imagenet64, tiny"):
        r3gan_cfg("ffhq1024")
    with pytest.raises(ConfigError, match="model.resolution=64.*32x32"):
        load_config(None, ["model.arch=r3gan", "model.r3gan.preset=cifar10", "model.resolution=64", "model.channels=3"])
    with pytest.raises(ConfigError, match="model.r3gan.cardinalities"):
        r3gan_cfg("tiny", "model.r3gan.cardinalities=[5,4,4,4]")


# ---- initialisation and resampling -------------------------------------------------------------
def test_blocks_start_as_the_identity_and_activations_keep_their_scale():
    """Fix-up init: every block's last layer is zero, so G(z) at init is the basis through the
    resamplers and 1x1 layers only; the variance-scaled gains keep the first block's output
    of order one (no normalisation anywhere)."""
    cfg = r3gan_cfg("cifar10")
    G, D = build_models(cfg.model, seed=0)
    projections = [m.project.weight for m in G.modules() if hasattr(m, "project")]
    assert projections and all(bool((w == 0).all()) for w in projections)
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        h = D.from_image(x)
        block = D.stages[0].layers[0]
        inner = block.act2(block.grouped(block.act1(block.expand(h))))
        assert 0.2 < inner.std().item() < 5, inner.std()
        assert torch.isfinite(D(x)).all() and torch.isfinite(G(torch.randn(2, 64))).all()


def test_init_std_of_every_layer_follows_the_fixup_rule():
    """Each weight's std at init from the paper's rule, worked out here from the architecture: N(0, 1/fan_in)
    (fan_in: one group's inputs times the kernel area), times leaky ReLU's gain sqrt(2 / 1.04) and
    L^(-1/4) (L = 8 blocks at cifar10) for a block's first two layers; a block's last layer and the
    activation biases zero; G's 4x4 basis N(0, 1); D's class embedding a further 1/sqrt(768). One draw
    of the cifar10 preset with 10 classes, each layer within 6 sampling errors (1/sqrt(2n) for n values):
    0.4% to 0.9% for the block layers, 9% for the 1x1 image layers, 17% for G's 640-value class embedding."""
    cfg = r3gan_cfg("cifar10", "model.num_classes=10")
    G, D = build_models(cfg.model, seed=0)
    block_gain = math.sqrt(2 / (1 + 0.2 ** 2)) * 8 ** -0.25
    width, inner, groups, z = 768, 1536, 96, 64
    expected = {"G": {"basis": 1.0, "linear": 1 / math.sqrt(2 * z), "to_image": 1 / math.sqrt(width),
                      "embed": 1 / math.sqrt(10)},
                "D": {"from_image": 1 / math.sqrt(3), "basis": 1 / math.sqrt(16), "linear": 1 / math.sqrt(width),
                      "embed": 1 / math.sqrt(width) / math.sqrt(10)}}
    blocks = {"expand": block_gain / math.sqrt(width), "grouped": block_gain / math.sqrt(inner // groups * 9),
              "project": 0.0, "act1": 0.0, "act2": 0.0}
    seen = {"G": set(), "D": set()}
    for net, model in (("G", G), ("D", D)):
        for name, w in model.named_parameters():
            leaf = name.split(".")[-2] if name.endswith((".weight", ".bias")) else name.split(".")[-1]
            want = blocks.get(leaf, expected[net].get(leaf))
            assert want is not None, f"{net}.{name}: no rule"  # cifar10 has one width: no 1x1 between stages
            seen[net].add(leaf)
            std = w.detach().double().square().mean().sqrt().item()
            if want == 0:
                assert std == 0, (net, name)
            else:
                assert abs(std / want - 1) < 6 / math.sqrt(2 * w.numel()), (net, name, std, want)
    assert seen["G"] == set(blocks) | set(expected["G"]) and seen["D"] == set(blocks) | set(expected["D"])


def test_fir_resampling_interpolates():
    """Upsampling a constant gives the constant (away from the border); down(up(x)) of a smooth
    image is close to x; the 4x4 kernel is [1, 3, 3, 1] / 8 in each direction."""
    from gan_dist.models.r3gan.networks import Resample, lowpass_kernel

    k = lowpass_kernel([1, 2, 1])
    row = torch.tensor([1.0, 3.0, 3.0, 1.0]) / 8
    torch.testing.assert_close(k, torch.outer(row, row))
    up, down = Resample([1, 2, 1], up=True), Resample([1, 2, 1], up=False)
    ones = torch.ones(1, 2, 8, 8)
    torch.testing.assert_close(up(ones)[..., 2:-2, 2:-2], torch.ones(1, 2, 12, 12))
    torch.testing.assert_close(down(ones)[..., 1:-1, 1:-1], torch.ones(1, 2, 2, 2))
    grid = torch.linspace(0, 1, 16)
    smooth = torch.sin(3 * grid)[None, None, :, None] * torch.cos(2 * grid)[None, None, None, :]
    back = down(up(smooth))
    assert (back - smooth)[..., 2:-2, 2:-2].abs().max() < 0.02


def _derivatives(f, x: torch.Tensor, params: list) -> list:
    """f(x), its input gradient under create_graph, and the gradients of an R1-like penalty on
    that gradient with respect to x and the parameters: what a D step with R1 differentiates."""
    y = f(x)
    g, = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(), x, create_graph=True)
    return [y, g, *torch.autograd.grad(g.square().sum() + y.square().sum(), [x, *params])]


@pytest.mark.parametrize("layer", ["up", "down", "pointwise", "basis"])
def test_fast_layers_equal_the_convolutions_they_replace(layer):
    """The slice-sum FIR resampling, the 1x1 convolutions as matmuls and D's depthwise basis as a
    dot product: the native convolutions' values and derivatives up to second order (float64,
    NCHW and channels_last), and their dtype under bf16 autocast."""
    import torch.nn.functional as F
    from gan_dist.models.r3gan.networks import DepthwiseBasisConv, PointwiseConv, Resample

    torch.manual_seed(0)
    if layer in ("up", "down"):
        m = Resample([1, 2, 1], up=layer == "up")
        fast, slow, params, shape = m, m.conv_resample, [], (2, 3, 8, 8)
    else:
        m = (PointwiseConv(5, 6, 1, bias=False) if layer == "pointwise"
             else DepthwiseBasisConv(5, 5, 4, groups=5, bias=False)).double()
        fast, slow, params, shape = m, lambda x: F.conv2d(x, m.weight, groups=m.groups), [m.weight], (2, 5, 4, 4)
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(shape, dtype=torch.float64).to(memory_format=fmt).requires_grad_(True)
        for a, b in zip(_derivatives(fast, x, params), _derivatives(slow, x, params)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    m.float()
    x = torch.randn(shape)
    with torch.autocast("cpu", torch.bfloat16):
        a, b = fast(x), slow(x)
    assert a.dtype == b.dtype == torch.bfloat16
    torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)


# ---- model.r3gan.bf16_stages: the reference's per-stage bf16 ------------------------------------
BF16_BASE = ("model.arch=r3gan", "model.r3gan.preset=tiny", "model.resolution=32", "model.channels=3",
             "train.precision=fp32")


def bf16_pair(n: int, classes: int = 0):
    """(G, D) in fp32 and (G, D) with `n` bf16 stages, same weights; every zero-initialised weight
    drawn at random, so that each block's branch takes part."""
    nets = []
    for stages in (0, n):
        cfg = load_config(None, [*BF16_BASE, f"model.num_classes={classes}", f"model.r3gan.bf16_stages={stages}"])
        nets.append(build_models(cfg.model, seed=0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for fp32, mixed in zip(nets[0], nets[1]):
            for p in fp32.parameters():
                if not p.any():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            mixed.load_state_dict(fp32.state_dict())
    return nets


def output_dtypes(model: torch.nn.Module) -> dict[str, torch.dtype]:
    """The dtype of every sub-module's output in the next forward, by name."""
    seen: dict[str, torch.dtype] = {}
    for name, m in model.named_modules():
        if name:
            m.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, out.dtype))
    return seen


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("classes", [0, 10])
def test_bf16_stages_compute_in_bf16_and_the_others_in_fp32(classes):
    """G's last 2 and D's first 2 of 4 stages, every layer inside them and G's to_image / D's
    from_image next to them compute in bf16, the rest in fp32; the outputs come back fp32, close
    to the fp32 networks' (bf16 rounding) but not equal to them."""
    (G0, D0), (G, D) = bf16_pair(2, classes)
    assert G.state_dict().keys() == G0.state_dict().keys() and D.state_dict().keys() == D0.state_dict().keys()
    assert all(p.dtype == torch.float32 for p in [*G.parameters(), *D.parameters()])
    z = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    c = torch.arange(4) % 10 if classes else None
    g_seen, d_seen = output_dtypes(G), output_dtypes(D)
    img = G(z, c)
    logit = D(img, c)
    assert img.dtype == logit.dtype == torch.float32
    in_bf16 = lambda name, stages: name.startswith(tuple(f"stages.{i}" for i in stages))
    for seen, bf16_stages, edge in ((g_seen, (2, 3), "to_image"), (d_seen, (0, 1), "from_image")):
        for name, dtype in seen.items():
            want = torch.bfloat16 if in_bf16(name, bf16_stages) or name == edge else torch.float32
            assert dtype == want, (name, dtype)
        assert sum(in_bf16(n, bf16_stages) for n in seen) > 10  # blocks, activations, resampling
    with torch.no_grad():
        img0 = G0(z, c)
        logit0 = D0(img0, c)
    for got, want in ((img, img0), (logit, logit0), (D(img0, c), logit0)):
        assert 1e-4 < rel(got, want) < 5e-2, rel(got, want)


def test_bf16_stages_gradients_reach_every_parameter_in_fp32_through_r1():
    """R1 (the input gradient under create_graph, then the penalty's backward) through D's bf16
    stages and G's loss through G and D: every parameter gets an fp32 gradient, close to the fp32
    networks' (cosine > 0.99 per parameter)."""
    nets = bf16_pair(2)
    grads = []
    for G, D in nets:
        gen = torch.Generator().manual_seed(3)
        real = torch.randn(4, 3, 32, 32, generator=gen).requires_grad_(True)
        logit = D(real)
        g, = torch.autograd.grad(logit.sum(), real, create_graph=True)
        assert g.dtype == torch.float32
        (g.square().sum() + logit.sum()).backward()
        D(G(torch.randn(4, 16, generator=gen))).sum().backward()
        grads.append([p.grad for p in [*G.parameters(), *D.parameters()]])
    for fp32, mixed in zip(*grads):
        assert mixed is not None and mixed.dtype == torch.float32 and mixed.any()
        cos = torch.nn.functional.cosine_similarity(mixed.flatten(), fp32.flatten(), dim=0)
        assert cos > 0.99, cos


def test_bf16_stages_settings():
    """The presets' reference counts (brownvc/R3GAN train.py FP16Stages: 3 at 32x32, 4 above),
    the range and the precision settings the stages need, each refusal naming the keys."""
    from gan_dist.models.r3gan import bf16_stages

    reference = {"cifar10": 3, "ffhq64": 4, "ffhq256": 4, "imagenet32": 3, "imagenet64": 4}
    for preset, n in reference.items():
        cfg = r3gan_cfg(preset, "train.precision=fp32", "model.r3gan.bf16_stages=preset")
        assert bf16_stages(cfg.model.r3gan) == n
    G, D = build_models(r3gan_cfg("cifar10", "train.precision=fp32", "model.r3gan.bf16_stages=preset").model, seed=0)
    assert [s.bf16 for s in G.stages] == [False, True, True, True]  # G's last 3, D's first 3
    assert [s.bf16 for s in D.stages] == [True, True, True, False]
    assert bf16_stages(r3gan_cfg("tiny").model.r3gan) == 0  # the default: none
    for bad in ("-1", "5", "auto", "1.5"):
        with pytest.raises(ConfigError, match=r"model.r3gan.bf16_stages=.* from 0 to 4"):
            load_config(None, [*BF16_BASE, f"model.r3gan.bf16_stages={bad}"])
    with pytest.raises(ConfigError, match=r"model.r3gan.bf16_stages=preset gives ffhq64's 4.*0 to 3"):
        r3gan_cfg("ffhq64", "train.precision=fp32", "model.r3gan.bf16_stages=preset", "model.resolution=16",
                  "model.r3gan.widths=[8,8,8]", "model.r3gan.cardinalities=[2,2,2]", "model.r3gan.blocks=[1,1,1]")
    for more, keys in ((["train.precision=bf16"], "train.precision=fp32 .now bf16"),
                       (["train.precision=fp16"], "train.precision=fp32 .now fp16"),
                       (["parallel.fsdp.param_dtype=bf16"], "parallel.fsdp.param_dtype=bf16")):
        with pytest.raises(ConfigError, match=rf"model.r3gan.bf16_stages=1 .*{keys}"):
            load_config(None, [*BF16_BASE, "model.r3gan.bf16_stages=1", *more])


# ---- every preset's recipe starts on a CPU --------------------------------------------------------
@pytest.mark.timeout(1500)  # the ImageNet presets: ~100 M parameters per network, R1 + R2 double backward
@pytest.mark.parametrize("preset", list(RESOLUTION))
def test_every_preset_config_trains_on_a_cpu(preset):
    """configs/r3gan_<preset>.yaml at its full widths: a step at batch 1 with the rpgan loss,
    R1 + R2 in the D step and the scheduled values applied; finite losses, both models move."""
    cfg = load_config(REPO / "configs" / f"r3gan_{preset}.yaml", ["train.batch_size=1", "parallel.strategy=none"])
    assert cfg.train.loss == "rpgan" and cfg.reg.d_every == 1 and cfg.train.precision == "bf16"
    strategy = build_strategy(INFO, cfg)
    schedules = Schedules(cfg)
    recipe, spec, _ = setup_models(strategy, schedules.initial)
    assert [p.terms for p in recipe.phases] == [("adv", "r1", "r2"), ("adv",)]
    before = {n: [p.detach().clone() for p in strategy.raw[n].parameters()] for n in ("G", "D")}
    R = cfg.model.resolution
    for step in range(1):
        schedules.apply(strategy, recipe, None, step)
        batches = step_batches(cfg, spec, step, 0, 1, lambda: torch.rand(1, 3, R, R) * 2 - 1, torch.device("cpu"))
        stats = train_step(strategy, recipe, batches, step)
        assert all(math.isfinite(v.item()) for v in stats.values()), stats
    assert recipe.gammas["r1"] == schedules.in_force["reg.r1_gamma"] > 0
    # the reference's augmentation: ADA with R3GAN's pipe, p on its schedule (0 at the start)
    assert recipe.augment.ops[-1] == "cutout" and recipe.augment.scales["hue"] == 0.5
    assert recipe.augment.fixed and recipe.augment.p.item() == schedules.in_force["augment.p"] == 0.0
    for n in ("G", "D"):
        assert any(not torch.equal(a, b) for a, b in zip(before[n], strategy.raw[n].parameters())), n
    strategy.close()


# ---- every strategy, exactly --------------------------------------------------------------------
from tests.test_recipe_exact import STRATEGIES, assert_each_update_reduces_its_model_once, job  # noqa: E402

# tiny widths (tests/workers/sharded_worker.py --model r3gan), the rpgan loss, R1 + R2 in every D step
R3GAN_PLAIN = ("--model", "r3gan", "--global-batch", "8", "--iters", "3", "--count-iter", "0",
               "--d-every", "1", "--loss", "rpgan")
R3GAN_EVERY_STEP = (*R3GAN_PLAIN, "--r1", "2", "--r2", "2")


def init_weights() -> dict:
    cfg = load_config(None, ["model.arch=r3gan", "model.r3gan.preset=tiny", "model.resolution=32", "model.channels=1"])
    G, D = build_models(cfg.model, seed=3)
    return {"G": G.state_dict(), "D": D.state_dict()}


def assert_same_weights(a: dict, b: dict) -> None:
    init, moved = init_weights(), 0.0
    for model in ("G", "D"):
        assert a[model].keys() == b[model].keys()
        for key, value in a[model].items():
            torch.testing.assert_close(value, b[model][key], rtol=1e-5, atol=1e-6, msg=lambda m: f"{model}.{key}: {m}")
            moved = max(moved, (value - init[model][key]).abs().max().item())
    assert moved > 5e-4, "training did not change the weights: the comparison would prove nothing"


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    """One process with the whole batch of 8."""
    return job(tmp_path_factory.mktemp("r3gan-one"), "one", 1, "--strategy", "none", *R3GAN_EVERY_STEP)[0]


@pytest.mark.multiproc
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", [n for n in STRATEGIES if n != "zero3_all"])
def test_two_processes_equal_one_with_twice_the_batch_and_reduce_once(tmp_path, one_process, name):
    r0, r1 = job(tmp_path, name, 2, *STRATEGIES[name], *R3GAN_EVERY_STEP)
    assert_same_weights(r0, one_process)
    for r in (r0, r1):
        assert_each_update_reduces_its_model_once(r, d_updates=1)  # R1 and R2 ride in Dmain


@pytest.mark.multiproc
@pytest.mark.timeout(900)
def test_penalties_change_the_r3gan_weights(tmp_path, one_process):
    """The comparison above would prove nothing if R1 and R2 had no effect."""
    plain = job(tmp_path, "plain", 1, "--strategy", "none", *R3GAN_PLAIN)[0]
    diff = max((plain["D"][k] - one_process["D"][k]).abs().max().item() for k in plain["D"])
    assert diff > 1e-4, f"R1/R2 hardly changed D ({diff})"


@pytest.mark.multiproc
@pytest.mark.timeout(900)
def test_bf16_stages_under_fsdp_equal_ddp(tmp_path, one_process):
    """model.r3gan.bf16_stages=2 with R1 + R2 in every D step: FSDP (which casts each stage's input
    to its fp32 param_dtype before the stage casts it to bf16) trains exactly as DDP on the same
    per-rank batches; and the stages are on (the weights are not the fp32 run's)."""
    bf16 = ("--set", "model.r3gan.bf16_stages=2")
    ddp = job(tmp_path, "ddp", 2, *STRATEGIES["ddp"], *R3GAN_EVERY_STEP, *bf16)[0]
    fsdp = job(tmp_path, "fsdp", 2, *STRATEGIES["fsdp"], *R3GAN_EVERY_STEP, *bf16)[0]
    assert_same_weights(fsdp, ddp)
    diff = max((fsdp["G"][k] - one_process["G"][k]).abs().max().item() for k in fsdp["G"])
    assert diff > 1e-3, f"the bf16 stages hardly changed G ({diff}): were they on?"
