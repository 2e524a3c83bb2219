"""The speed settings (fused Adam, channels_last, torch.compile) change how the training step
runs, never what it computes: the same updates as the plain eager fp32 step."""
from __future__ import annotations

import pytest
import torch

from gan_dist.config import load_config
from gan_dist.distributed import DistInfo
from gan_dist.loop import Batch, train_step
from gan_dist.build import setup_models
from gan_dist.parallel import build_strategy
from gan_dist.parallel.base import NAMES

# the plain eager fp32 step: every speed setting off
TINY = ["model.resolution=32", "model.channels=1", "model.dcgan.ngf=4", "model.dcgan.ndf=4", "model.dcgan.nz=8", "train.batch_size=4", "train.precision=fp32",
        "parallel.strategy=none", "train.channels_last=false", "train.compile=false"]
INFO = DistInfo(0, 1, 0, 1, 0, torch.device("cpu"), None, "python")


def train(overrides: list[str], steps: int = 2):
    cfg = load_config(None, [*TINY, *overrides])
    strategy = build_strategy(INFO, cfg)
    recipe, _, _ = setup_models(strategy, cfg, seed=0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        real = torch.rand(4, 1, 32, 32, generator=gen) * 2 - 1
        z = torch.randn(4, 8, generator=gen)
        train_step(strategy, recipe, [[Batch(real, z)]])
    state = {n: {k: v.detach().clone() for k, v in strategy.raw[n].state_dict().items()} for n in NAMES}
    return strategy, state


def assert_same_updates(a: dict, b: dict) -> None:
    for n in NAMES:
        assert list(a[n]) == list(b[n]), f"{n}: state_dict keys differ"
        for key in a[n]:
            torch.testing.assert_close(a[n][key], b[n][key], rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}.{key}: {m}")


@pytest.fixture(scope="module")
def eager():
    return train([])[1]


def test_adam_is_fused_on_cpu_and_matches_foreach(eager):
    strategy, _ = train([], steps=0)
    assert all(strategy.optimizers[n].defaults["fused"] for n in NAMES)
    # the same updates as the foreach implementation
    cfg = load_config(None, TINY)
    foreach = build_strategy(INFO, cfg)
    recipe, _, _ = setup_models(foreach, cfg, seed=0, make_optimizer=lambda name, params, **kw: torch.optim.Adam(
        params, lr=cfg.train.lr_g, betas=(cfg.train.beta1, cfg.train.beta2), foreach=True))
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        train_step(foreach, recipe, [[Batch(torch.rand(4, 1, 32, 32, generator=gen) * 2 - 1, torch.randn(4, 8, generator=gen))]])
    assert not foreach.optimizers["G"].defaults["fused"]
    assert_same_updates(eager, {n: foreach.raw[n].state_dict() for n in NAMES})


def test_channels_last_same_updates(eager):
    def conv_inputs_nhwc(strategy) -> list[bool]:
        seen: list[bool] = []
        for n in NAMES:
            for m in strategy.raw[n].modules():
                if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                    assert m.weight.is_contiguous()  # parameters stay shardable
                    m.register_forward_pre_hook(lambda mod, args: seen.append(
                        args[0].is_contiguous(memory_format=torch.channels_last)))
        strategy.raw["D"](strategy.raw["G"](torch.randn(2, 8)))
        return seen

    strategy, state = train(["train.channels_last=true"])
    assert conv_inputs_nhwc(strategy) == [True] * 8
    assert not all(conv_inputs_nhwc(train([], steps=0)[0]))  # NCHW without the setting
    assert_same_updates(eager, state)


@pytest.mark.timeout(900)
def test_compile_same_updates_and_same_module(eager):
    strategy, state = train(["train.compile=true"])
    for n in NAMES:
        # compiled in place: the module trained is the eager one, with its own state_dict keys
        assert strategy.raw[n] is strategy.wrapped[n]
        assert getattr(strategy.raw[n], "_compiled_call_impl", None) is not None
    assert_same_updates(eager, state)
