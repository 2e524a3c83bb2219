"""DiffAugment and ADA: per-sample draws by (seed, step, call, global index), differentiable to
second order (R1 through an augmented D), applied to real and fake images in every D call,
ADA's p moved by the overfitting heuristic identically on every rank and restored bitwise on
resume, bad settings refused naming the key; and 2 processes x b equal 1 process x 2b."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gan_dist.augment import ADA, DiffAugment, build_augment
from gan_dist.augment.ada import N_NORMAL, N_UNIFORM, ada_augment, ops_of
from gan_dist.augment.draws import draws
from gan_dist.config import ConfigError, load_config
from tests._mp import PYTHON, REPO, base_env, run
from tests.conftest import TINY

pytestmark = pytest.mark.timeout(900)
SMALL = ["model.resolution=32", "model.channels=1", "model.dcgan.ngf=8", "model.dcgan.ndf=8", "model.dcgan.nz=16",
         "model.dcgan.norm=none", "train.precision=fp32", "train.batch_size=4"]


def images(n: int = 8, c: int = 3, side: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("augment", [DiffAugment(7, ["color", "translation", "cutout"]),
                                     ADA(7, "bgc", 0.8, 0.6, 4, 500, 0.0)], ids=["diffaugment", "ada"])
def test_draws_are_per_sample_by_global_index(augment):
    x = images()
    whole = augment.apply(x, 3, 11, range(100, 108))
    halves = torch.cat([augment.apply(x[:4], 3, 11, range(100, 104)), augment.apply(x[4:], 3, 11, range(104, 108))])
    torch.testing.assert_close(whole, halves, rtol=0, atol=1e-6)  # 2 x b augments what 1 x 2b does
    assert (whole - x).abs().mean() > 0.05  # it does something
    other_step = augment.apply(x, 4, 11, range(100, 108))
    other_call = augment.apply(x, 3, 12, range(100, 108))
    assert (other_step - whole).abs().max() > 0.1 and (other_call - whole).abs().max() > 0.1


def test_diffaugment_transforms():
    x = images(64, 3, 16)
    u, _ = draws(0, 0, 0, range(64), 2, 0, "cpu")
    from gan_dist.augment.diffaugment import cutout, translation

    cut = cutout(x, u)
    share = (cut == 0).float().mean().item()
    assert 0.12 < share < 0.26  # a half-side square: a quarter of the image, less where it hangs over
    moved = translation(x, u)
    shifts = []
    for i in range(64):  # each image is the original shifted by at most 2 px (1/8 of 16), zeros shifted in
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if torch.equal(moved[i], _shift(x[i], dy, dx))]
        assert found, i
        shifts.append(found[0])
    assert len(set(shifts)) > 10


def test_diffaugment_colour_and_gradients_follow_the_definition():
    from gan_dist.augment.diffaugment import color, diffaugment

    x = images(6, 3, 8).double()
    u, _ = draws(0, 1, 2, range(6), 7, 0, "cpu")
    u = u.double()
    b, s, c = (u[:, i].view(-1, 1, 1, 1) for i in range(3))
    y = x + (b - 0.5)  # Zhao et al.'s three steps, one after the other
    y = (y - y.mean(dim=1, keepdim=True)) * (s * 2) + y.mean(dim=1, keepdim=True)
    y = (y - y.mean(dim=(1, 2, 3), keepdim=True)) * (c + 0.5) + y.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(color(x, u[:, :3]), y, rtol=0, atol=1e-12)
    # the translation's own backward (the opposite shift) and its second derivative
    policy = ["color", "translation", "cutout"]
    small = x[:3].detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: diffaugment(t, u[:3], policy), (small,), fast_mode=True)
    assert torch.autograd.gradgradcheck(lambda t: diffaugment(t, u[:3], policy), (small,), fast_mode=True)
    assert diffaugment(x.float().contiguous(memory_format=torch.channels_last), u, policy).dtype == torch.float32


def _shift(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    out = torch.zeros_like(img)
    H, W = img.shape[1:]
    out[:, max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)] = img[:, max(-dy, 0):H - max(dy, 0), max(-dx, 0):W - max(dx, 0)]
    return out


def test_ada_ops():
    x = images(16, 3, 16)
    u, n = draws(0, 0, 0, range(16), N_UNIFORM, N_NORMAL, "cpu")
    for c in (1, 3):
        y = ada_augment(x[:, :c], u, n, torch.tensor(0.0), ops_of("bgc"))
        torch.testing.assert_close(y, x[:, :c], rtol=0, atol=1e-5)  # p = 0: nothing happens
    # the geometric ops resample through the wavelet filter: exact on smooth images only
    s = smooth_images(16, 3, 16)
    near = lambda a, b: (a - b).abs().max().item() < 0.1  # noqa: E731 (a flip changes these by > 1)
    flips = ada_augment(s, u, n, torch.tensor(1.0), ("xflip",))
    kinds = [near(flips[i], s[i].flip(-1)) for i in range(16)]
    assert all(k or near(flips[i], s[i]) for i, k in enumerate(kinds)) and 3 < sum(kinds) < 13
    rot = ada_augment(s, u, n, torch.tensor(1.0), ("rotate90",))
    assert all(any(near(rot[i], s[i].rot90(k, (1, 2))) for k in range(4)) for i in range(16))
    # colour: a luma flip or a hue rotation keeps the luma-axis component's magnitude of a pixel
    col = ada_augment(x, u, n, torch.tensor(1.0), ("lumaflip", "hue"))
    luma = lambda t: t.sum(dim=1).abs() / 3 ** 0.5  # noqa: E731
    torch.testing.assert_close(luma(col), luma(x), rtol=1e-4, atol=1e-4)
    # each op applies with probability p: at p = 0.5 about half the samples are flipped
    u2, n2 = draws(1, 0, 0, range(400), N_UNIFORM, N_NORMAL, "cpu")
    z = images(400, 1, 4, seed=2)
    half = ada_augment(z, u2, n2, torch.tensor(0.5), ("xflip",))
    changed = ((half - z).abs().flatten(1).max(dim=1).values > 1e-4).float().mean().item()
    assert 0.17 < changed < 0.33  # applied with p = 0.5, and then a flip 1 time in 2
    # augment.p_scale multiplies an op's p: at p = 1 and scale 0.5, the same as p = 0.5
    scaled = ada_augment(z, u2, n2, torch.tensor(1.0), ("xflip",), {"xflip": 0.5})
    torch.testing.assert_close(scaled, half, rtol=0, atol=0)
    assert not torch.equal(ada_augment(z, u2, n2, torch.tensor(1.0), ("xflip",)), half)
    off = ada_augment(x, u, n, torch.tensor(1.0), ops_of("bgc"), {op: 0.0 for op in ops_of("bgc")})
    torch.testing.assert_close(off, x, rtol=0, atol=1e-5)


def test_ada_cutout_zeroes_a_half_side_square_with_probability_p():
    side = 32
    x = images(400, 3, side, seed=3).abs() + 0.1  # no zeros of its own
    u, n = draws(0, 0, 0, range(400), N_UNIFORM, N_NORMAL, "cpu")
    y = ada_augment(x, u, n, torch.tensor(0.5), ("cutout",))
    zero = y == 0
    assert torch.equal(zero, zero[:, :1].expand_as(zero))  # every channel alike
    cut = zero[:, 0].flatten(1).any(dim=1)
    assert 0.42 < cut.float().mean().item() < 0.58  # applied with p = 0.5
    torch.testing.assert_close(y[~cut], x[~cut], rtol=0, atol=0)
    torch.testing.assert_close(y[zero.logical_not()], x[zero.logical_not()], rtol=0, atol=0)
    for i in cut.nonzero().flatten().tolist():
        rows, cols = zero[i, 0].any(dim=1), zero[i, 0].any(dim=0)
        # a square of side/2 (clipped by the border) about the drawn centre, and nothing else
        assert torch.equal(zero[i, 0], rows[:, None] & cols[None, :])
        cy, cx = u[i, 23].item() * side, u[i, 22].item() * side
        for mask, c in ((rows, cy), (cols, cx)):
            inside = [k for k in range(side) if abs(k + 0.5 - c) < side / 4]
            assert mask.nonzero().flatten().tolist() == inside


def smooth_images(n: int, c: int, side: int, seed: int = 0) -> torch.Tensor:
    """Band-limited images (bicubic from 4 x 4 noise)."""
    coarse = torch.rand(n, c, 4, 4, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False)


def test_ada_resamples_through_the_wavelet_filter():
    """StyleGAN2-ADA's geometric resampling: 2x up with the sym6 low-pass, bilinear, 2x down."""
    import math

    import torch.nn.functional as F

    from gan_dist.augment.ada import _rotate, _scale, _translate, resample
    from gan_dist.augment.fir import SYM6

    h = torch.tensor(SYM6, dtype=torch.float64)  # an orthonormal low-pass: up then down is the identity
    assert abs(h.sum().item() - 2 ** 0.5) < 1e-9
    assert all(abs((h[:12 - 2 * k] * h[2 * k:]).sum().item() - (k == 0)) < 1e-9 for k in range(6))
    x = images(4, 3, 16)
    torch.testing.assert_close(resample(x, torch.eye(3).expand(4, 3, 3)), x, rtol=0, atol=1e-5)
    # half a pixel to the right: a band-limited wave moves by the analytic amount, which plain
    # bilinear sampling (averaging neighbours) misses by 20x more
    S, f = 16, 0.15
    yy, xx = torch.meshgrid(torch.arange(S).double(), torch.arange(S).double(), indexing="ij")
    wave = lambda dx: torch.cos(2 * math.pi * f * (xx - dx + 0.6 * yy) + 0.4).view(1, 1, S, S).float()  # noqa: E731
    G = _translate(torch.tensor([-1.0 / S]), torch.zeros(1))
    inner = (0, 0, slice(4, -4), slice(4, -4))
    filtered = (resample(wave(0), G) - wave(0.5))[inner].abs().max().item()
    grid = F.affine_grid(G[:, :2], [1, 1, S, S], align_corners=False)
    bilinear = (F.grid_sample(wave(0), grid, padding_mode="reflection", align_corners=False) - wave(0.5))[inner]
    assert filtered < 0.005 and bilinear.abs().max().item() > 20 * filtered
    # the transforms' centre: a flip and a rotation by 90 degrees of smooth images, through the
    # general matrix path, land where torch's do (off by a quarter pixel they would be 5x worse)
    s = smooth_images(8, 3, 16)
    one = torch.ones(8)
    assert (resample(s, _scale(-one, one)) - s.flip(-1)).abs().max().item() < 0.1
    assert (resample(s, _rotate(math.pi / 2 * one)) - s.rot90(1, (2, 3))).abs().max().item() < 0.1


@pytest.mark.parametrize("augment", [DiffAugment(0, ["color", "translation", "cutout"]),
                                     ADA(0, "bgc", 0.7, 0.6, 4, 500, 0.0)], ids=["diffaugment", "ada"])
def test_r1_through_the_augmentation_is_a_second_order_gradient_wrt_the_raw_images(augment):
    D = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Softplus(), torch.nn.Flatten(), torch.nn.LazyLinear(1))
    x = images(4, 3, 16).requires_grad_(True)
    logits = D(augment.apply(x, 0, 1, range(4)))
    grad, = torch.autograd.grad(logits.sum(), x, create_graph=True)
    assert grad.shape == x.shape and grad.abs().sum() > 0  # w.r.t. the images before augmentation
    grad.square().sum().backward()
    # every weight (a bias after the last layer has no input gradient, so no penalty gradient)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in D.parameters() if p.dim() > 1)


def _setup(*overrides: str):
    from gan_dist.build import setup_models
    from gan_dist.distributed import DistInfo
    from gan_dist.parallel.base import Strategy

    cfg = load_config(None, [*SMALL, *overrides])
    strategy = Strategy(DistInfo(0, 1, 0, 1, 0, torch.device("cpu"), None, "python"), cfg.train, cfg.parallel)
    recipe, spec, _ = setup_models(strategy, cfg)
    return cfg, strategy, recipe, spec


def _batches(cfg, spec, step):
    from gan_dist.build import step_batches

    gen = torch.Generator().manual_seed(step)
    real = lambda: (torch.rand(4, 1, 32, 32, generator=gen) * 2 - 1, torch.randint(3, (4,), generator=gen))  # noqa: E731
    return step_batches(cfg, spec, step, 0, 1, real, torch.device("cpu"))


# D calls per step: Dmain real + fake, Dreg's reals (due at step 0), Gmain's fakes (+ rpgan: its reals)
@pytest.mark.parametrize("loss,calls", [("nonsaturating", {0: 4, 1: 3}), ("rpgan", {0: 5, 1: 4})])
def test_every_d_call_goes_through_the_augmentation(loss, calls):
    """Dmain's real and fake, Dreg's penalised reals, Gmain's fakes (and rpgan's reals there)."""
    from gan_dist.loop import train_step

    cfg, strategy, recipe, spec = _setup("augment.kind=diffaugment", "reg.r1_gamma=1", "reg.d_every=2",
                                         f"train.loss={loss}", "model.num_classes=3")
    seen: list = []
    inner = strategy.wrapped["D"]

    def D(x, c):
        seen.append((x.detach().clone(), c))
        return inner(x, c)
    strategy.wrapped["D"] = D
    for step, expected in calls.items():
        seen.clear()
        batches = _batches(cfg, spec, step)
        raw = [batches[0][0].real]
        train_step(strategy, recipe, batches, step)
        assert len(seen) == expected
        for x, c in seen:  # D never sees an un-augmented real image
            assert c is not None and not any(torch.equal(x, r) for r in raw)
    strategy.close()


def test_ada_moves_p_toward_the_target():
    ada = ADA(0, "bgc", None, 0.6, 2, 0.016, 0.0)  # kimg 0.016: 16 images move p from 0 to 1
    ada.observe(torch.tensor([1.0, 2.0, 3.0, -1.0]))  # r = 0.5 < 0.6: p would go down, stays at 0
    assert ada.end_step(0) == {"augment/p": ada.p, "augment/r_t": ada.r_t} and ada.p.item() == 0.0
    ada.observe(torch.tensor([1.0, 2.0, 3.0, -1.0]))
    ada.end_step(1)
    assert ada.p.item() == 0.0 and abs(ada.r_t.item() - 0.5) < 1e-6
    for step in (2, 3):
        ada.observe(torch.ones(4))  # r = 1 > 0.6: D is overfitting: p up by 8 / 16 images
        ada.end_step(step)
    assert ada.p.item() == 0.5 and ada.r_t.item() == 1.0
    state = ada.state_dict()
    other = ADA(0, "bgc", None, 0.6, 2, 0.016, 0.0)
    other.load_state_dict(state)
    assert torch.equal(other.p, ada.p) and torch.equal(other.signs, ada.signs)
    fixed = ADA(0, "bgc", 0.3, 0.6, 1, 0.016, 0.0)
    fixed.observe(torch.ones(4))
    fixed.end_step(0)
    assert fixed.p.item() == pytest.approx(0.3)  # augment.p fixes it


@pytest.mark.parametrize("override,key", [("augment.kind=randaugment", "augment.kind"),
                                          ("augment.policy=color,blur", "augment.policy"),
                                          ("augment.pipeline=bgx", "augment.pipeline"),
                                          ("augment.target=1.0", "augment.target"),
                                          ("augment.target=0", "augment.target"),
                                          ("augment.p=1.5", "augment.p"),
                                          ("augment.p_scale={flip: 0.5}", "augment.p_scale.flip"),
                                          ("augment.p_scale={hue: -0.5}", "augment.p_scale.hue")])
def test_bad_settings_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_bad_augmentation_exits_2(tmp_path):
    r = run([PYTHON, "-m", "gan_dist.train", *TINY, f"run.dir={tmp_path}", "augment.kind=mixup"], timeout=120,
            check=False, env=base_env(), cwd=REPO)
    assert r.returncode == 2 and "augment.kind='mixup'" in r.stderr, r.stderr


def test_build_augment_follows_the_config():
    assert build_augment(load_config(None, [])) is None
    assert isinstance(build_augment(load_config(None, ["augment.kind=diffaugment", "augment.policy=cutout"])), DiffAugment)
    ada = build_augment(load_config(None, ["augment.kind=ada", "augment.pipeline=bg"]))
    assert isinstance(ada, ADA) and "hue" not in ada.ops and "xflip" in ada.ops


# ---- ADA's p across a resume, in a real training run ----------------------------------------------
# the target above any r_t: p moves down from p_init by 16 / 1000 every 2 steps
ADA_RUN = ["augment.kind=ada", "augment.target=0.99", "augment.p_init=0.8", "augment.interval=2", "augment.kimg=1",
           "model.num_classes=auto",
           "train.ckpt_every=1000", "train.log_every=1"]


def _train(run_dir: Path, *extra: str):
    return run([PYTHON, "-m", "gan_dist.train", *TINY, "model.dcgan.norm=batch", f"run.dir={run_dir}", *ADA_RUN, *extra],
               timeout=300, env=base_env(), cwd=REPO)


def _trainer_state(run_dir: Path) -> dict:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return torch.load(run_dir / "checkpoints" / latest / "trainer.pt", weights_only=True)


def test_ada_p_and_the_run_continue_bitwise_after_resume(tmp_path):
    from tests._ckpt import assert_tensors_equal, sha

    _train(tmp_path / "whole", "train.steps=10")
    _train(tmp_path / "parts", "train.steps=5")
    p_at_5 = _trainer_state(tmp_path / "parts")["recipe"]["augment"]["p"]
    assert p_at_5.item() < 0.8  # moved (E sign D(x) is below the target) and saved mid-run
    r = _train(tmp_path / "parts", "train.steps=10")
    assert "resumed from" in r.stderr
    whole, parts = _trainer_state(tmp_path / "whole"), _trainer_state(tmp_path / "parts")
    assert_tensors_equal(whole["recipe"], parts["recipe"], "recipe")  # p, the interval's running sums
    assert whole["recipe"]["augment"]["p"].item() < p_at_5.item()
    assert sha(tmp_path / "whole" / "generator.pt") == sha(tmp_path / "parts" / "generator.pt")
    # p is logged to TensorBoard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "whole" / "tb"))
    acc.Reload()
    ps = [e.value for e in acc.Scalars("augment/p")]
    assert len(ps) >= 5 and ps[-1] == pytest.approx(whole["recipe"]["augment"]["p"].item())


# ---- 2 processes x b == 1 process x 2b ----------------------------------------------------------------
DIFFAUG = ("--global-batch", "8", "--iters", "3", "--r1", "100", "--d-every", "1", "--loss", "hinge",
           "--set", "augment.kind=diffaugment")
# a conditional D; the target above any r_t: p moves down by 16 / 80 after iterations 1 and 3
ADA_EXACT = ("--global-batch", "8", "--iters", "4", "--num-classes", "4", "--r1", "100", "--d-every", "2",
             "--set", "augment.kind=ada", "--set", "augment.interval=2", "--set", "augment.target=0.99",
             "--set", "augment.kimg=0.08", "--set", "augment.p_init=0.9")
AUGMENTED = {"diffaugment": DIFFAUG, "ada": ADA_EXACT}


@pytest.fixture(scope="module")
def augment_references(tmp_path_factory) -> dict:
    from tests.test_recipe_exact import job

    tmp = tmp_path_factory.mktemp("one")
    return {name: job(tmp, name, 1, "--strategy", "none", *args)[0] for name, args in AUGMENTED.items()}


@pytest.mark.multiproc
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero1", "zero2", "zero3"])
@pytest.mark.parametrize("kind", list(AUGMENTED))
def test_augmented_two_processes_equal_one(tmp_path, augment_references, kind, strategy):
    from tests.test_conditional import assert_same_weights
    from tests.test_recipe_exact import STRATEGIES, job

    r0, r1 = job(tmp_path, f"{kind}-{strategy}", 2, *STRATEGIES[strategy], *AUGMENTED[kind])
    ref = augment_references[kind]
    assert_same_weights(r0, ref, num_classes=4 if kind == "ada" else 0)
    if kind == "ada":  # p moved twice, by the global r_t, to the same value on every rank
        p = ref["recipe_state"]["augment"]["p"]
        assert p.item() == pytest.approx(0.5, abs=1e-6)
        for r in (r0, r1):
            assert torch.equal(r["recipe_state"]["augment"]["p"], p)


@pytest.mark.multiproc
def test_augmentation_changes_the_run(tmp_path, augment_references):
    """The comparisons above would prove nothing if the augmentation had no effect."""
    from tests.test_recipe_exact import job

    for kind, args in AUGMENTED.items():
        args = list(args)
        cut = args.index("--set")
        plain = job(tmp_path, f"plain-{kind}", 1, "--strategy", "none", *args[:cut])[0]
        diff = max((plain["D"][k] - augment_references[kind]["D"][k]).abs().max().item() for k in plain["D"])
        assert diff > 1e-3, (kind, diff)
