"""Schedules (gan_dist/schedules.py): values along the schedule, what the trainer applies before a
step (optimizer, gammas, EMA, ADA's p), bad schedules as one-line errors naming the key, and a resumed run
that continues the schedule bitwise."""
from __future__ import annotations

import math

import pytest
import torch

from gan_dist.build import setup_models
from gan_dist.config import ConfigError, load_config
from gan_dist.distributed import DistInfo
from gan_dist.ema import build_ema
from gan_dist.parallel import build_strategy
from gan_dist.schedules import Schedule, Schedules, parse
from tests._ckpt import assert_tensors_equal
from tests._mp import PYTHON, base_env, run

INFO = DistInfo(0, 1, 0, 1, 0, torch.device("cpu"), None, "python")
TINY = ["model.arch=r3gan", "model.r3gan.preset=tiny", "model.resolution=32", "model.channels=1"]


def test_cosine_and_linear_values_along_the_schedule():
    cos = Schedule(2.0, 0.5, kimg=10, shape="cosine")
    lin = Schedule(2.0, 0.5, kimg=10, shape="linear")
    assert cos.at(0) == lin.at(0) == 2.0
    assert cos.at(5000) == pytest.approx(1.25) and lin.at(5000) == pytest.approx(1.25)  # halfway
    assert cos.at(2500) == pytest.approx(2.0 - 1.5 * 0.5 * (1 - math.cos(math.pi / 4)))
    assert lin.at(2500) == pytest.approx(2.0 - 1.5 / 4)
    assert cos.at(2500) > lin.at(2500)  # the cosine leaves its start slowly
    assert cos.at(10000) == cos.at(1e9) == lin.at(12345) == 0.5  # then holds the end
    assert Schedule(1.0, 3.0, kimg=0).at(0) == 3.0  # no length: the end at once
    assert parse("train.lr_g", {"start": 1e-3, "end": 1e-4, "kimg": 4}) == Schedule(1e-3, 1e-4, 4.0, "cosine")
    assert parse("reg.r1_gamma", 2) == 2.0


def test_apply_sets_optimizer_gammas_and_ema_with_the_lazy_rescaling():
    cfg = load_config(None, [*TINY, "train.batch_size=2", "reg.d_every=4", "train.beta1=0.5",
                             "train.lr_g={start: 1e-3, end: 1e-4, kimg: 1}", "train.lr_d=2e-3",
                             "train.beta2={start: 0.9, end: 0.99, kimg: 1, shape: linear}",
                             "reg.r1_gamma={start: 0, end: 8, kimg: 2, shape: linear}",
                             "ema.half_life_kimg={start: 0, end: 5, kimg: 1}",
                             "augment.kind=ada", "augment.p={start: 0, end: 0.6, kimg: 1, shape: linear}"])
    strategy = build_strategy(INFO, cfg)
    sched = Schedules(cfg)
    recipe, _, _ = setup_models(strategy, sched.initial)
    ema = build_ema(strategy, sched.initial.ema)
    assert "r1" in recipe.gammas  # zero at the start but positive later: the penalty phase exists
    v = sched.apply(strategy, recipe, ema, 500)
    lr_g = 1e-4 + (1e-3 - 1e-4) * 0.5
    assert v["train.lr_g"] == pytest.approx(lr_g) and v["train.beta2"] == pytest.approx(0.945)
    g = strategy.optimizers["G"].param_groups[0]
    assert g["lr"] == pytest.approx(lr_g) and g["betas"] == pytest.approx((0.5, 0.945))
    d = strategy.optimizers["D"].param_groups[0]  # lazy every 4: lr * 4/5, betas ** (4/5)
    assert d["lr"] == pytest.approx(2e-3 * 0.8) and d["betas"] == pytest.approx((0.5 ** 0.8, 0.945 ** 0.8))
    assert recipe.gammas["r1"] == pytest.approx(2.0) and ema.half_life_kimg == pytest.approx(2.5)
    assert sched.scalars()["schedule/reg.r1_gamma"] == pytest.approx(2.0)
    assert recipe.augment.fixed and recipe.augment.p.item() == pytest.approx(0.3)  # ADA's p, scheduled
    sched.apply(strategy, recipe, ema, 10**6)
    assert strategy.optimizers["G"].param_groups[0]["lr"] == pytest.approx(1e-4) and recipe.gammas["r1"] == 8.0
    assert recipe.augment.p.item() == pytest.approx(0.6)
    # a constant p stays ADA's fixed p; null leaves p to its heuristic (not fixed, starts at p_init)
    for p, fixed, start in (("0.25", True, 0.25), ("null", False, 0.1)):
        plain = load_config(None, [*TINY, "augment.kind=ada", f"augment.p={p}", "augment.p_init=0.1"])
        s2 = Schedules(plain)
        r2, _, _ = setup_models(build_strategy(INFO, plain), s2.initial)
        s2.apply(strategy, r2, None, 10**6)
        assert (r2.augment.fixed, r2.augment.p.item()) == (fixed, pytest.approx(start))


@pytest.mark.parametrize("override,message", [
    ("train.beta2={start: 0.9, end: 1.0, kimg: 100}", "train.beta2.end=1.0: train.beta2 must be in [0, 1)"),
    ("reg.r1_gamma={start: 1, end: -0.5, kimg: 100}", "reg.r1_gamma.end=-0.5"),
    ("train.lr_g={start: 1e-3, end: 1e-4, kimg: -5}", "train.lr_g.kimg=-5 must be >= 0"),
    ("ema.half_life_kimg={start: 0, end: 10, kimg: 5, shape: exponential}", "ema.half_life_kimg.shape='exponential'"),
    ("train.lr_d={start: 1e-3, kimg: 5}", "train.lr_d: .*missing: end"),
    ("train.lr_d=0", "train.lr_d=0 must be > 0"),
    ("augment.p={start: 0, end: 1.5, kimg: 100}", "augment.p.end=1.5: augment.p must be in [0, 1]"),
    ("augment.p=-0.5", "augment.p=-0.5 must be in [0, 1] (or null"),
])
def test_bad_schedules_are_config_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
                       if "*" not in message else message):
        load_config(None, [override])


def test_bad_schedule_exits_2_from_the_command_line(tmp_path):
    r = run([PYTHON, "-m", "gan_dist.train", f"run.dir={tmp_path / 'run'}",
             "train.beta2={start: 0.9, end: 1.5, kimg: 10}"], timeout=120, check=False)
    assert r.returncode == 2, r.stderr
    assert "train.beta2" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


SCHEDULED = [*TINY, "train.batch_size=4", "train.loss=rpgan", "train.beta1=0", "eval.enabled=false",
             "train.log_every=1", "train.sample_every=1000", "train.ckpt_every=1000", "data.num_workers=0",
             "train.precision=fp32",
             # 12 steps of 4 images: every value moves at every step
             "train.lr_g={start: 2e-3, end: 1e-4, kimg: 0.048}", "train.lr_d={start: 2e-3, end: 1e-4, kimg: 0.048}",
             "train.beta2={start: 0.9, end: 0.99, kimg: 0.048}",
             "reg.r1_gamma={start: 1, end: 0.1, kimg: 0.048, shape: linear}", "reg.r2_gamma=0.5",
             "ema.half_life_kimg={start: 0, end: 0.1, kimg: 0.048}", "ema.rampup=null",
             "augment.kind=ada", "augment.pipeline=bgc", "augment.p={start: 0, end: 0.8, kimg: 0.048, shape: linear}"]


def _train(run_dir, *extra):
    r = run([PYTHON, "-m", "gan_dist.train", f"run.dir={run_dir}", *SCHEDULED, *extra], timeout=400,
            env=base_env(threads=1), check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


@pytest.mark.timeout(900)
def test_resumed_run_continues_the_schedule_bitwise(tmp_path):
    _train(tmp_path / "whole", "train.steps=12")
    _train(tmp_path / "split", "train.steps=5")
    r = _train(tmp_path / "split", "train.steps=12")
    assert "at step 5" in r.stderr
    for name in ("generator.pt", "generator_ema.pt"):
        a = torch.load(tmp_path / "whole" / name, weights_only=True)
        b = torch.load(tmp_path / "split" / name, weights_only=True)
        assert_tensors_equal(a, b, name)
    # the scheduled values reached TensorBoard: read back from the event file of the whole run
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "whole" / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    lr = [e.value for e in acc.Scalars(next(t for t in tags if t.endswith("schedule/train.lr_g")))]
    assert lr[0] == pytest.approx(2e-3) and lr[-1] < lr[0] / 2, lr
    assert sorted(lr, reverse=True) == lr
    p = [e.value for e in acc.Scalars(next(t for t in tags if t.endswith("augment/p")))]
    assert p[0] == 0.0 and p[-1] == pytest.approx(0.8 * 11 / 12) and sorted(p) == p, p
