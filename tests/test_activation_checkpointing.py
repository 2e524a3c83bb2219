"""train.activation_checkpointing: every family's blocks recompute their activations in the
backward, and training ends with the weights (and buffers) it ends with without: bitwise in one
process for every phase (R1/R2 in Dreg or in Dmain, StyleGAN2's path length), and two FSDP2
ranks equal one process with the whole batch. The activations D's forward saves really drop,
state_dict keys stay those of the plain model, and bad values are refused naming the key.
"""
from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint

from gan_dist.build import setup_models, step_batches
from gan_dist.config import ConfigError, load_config
from gan_dist.distributed import DistInfo
from gan_dist.loop import train_step
from gan_dist.models import build_models
from gan_dist.parallel import build_strategy
from gan_dist.parallel.checkpointing import is_checkpointed
from tests._mp import REPO, run_ranks
from tests.workers.sharded_worker import STYLEGAN2_TINY

INFO = DistInfo(0, 1, 0, 1, 0, torch.device("cpu"), None, "python")
KEY = "train.activation_checkpointing"
COMMON = ["model.resolution=32", "model.channels=1", "parallel.strategy=none", "train.precision=fp32",
          "train.batch_size=4", "train.lr_g=0.01", "train.lr_d=0.01", "ema.enabled=false"]
# every phase of each family: BatchNorm (DCGAN, with R1 in Dmain), StyleGAN2 (lazy R1 in Dreg,
# path length in Greg, style mixing and noise inputs), R3GAN (R1 + R2 in Dmain, the rpgan loss)
FAMILIES = {
    "dcgan": ["model.dcgan.ngf=8", "model.dcgan.ndf=8", "model.dcgan.nz=16", "model.dcgan.norm=batch",
              "reg.r1_gamma=1", "reg.d_every=1"],
    "stylegan2": ["model.arch=stylegan2", *STYLEGAN2_TINY, "model.stylegan2.pl_every=2",
                  "model.stylegan2.mbstd_group=2", "reg.r1_gamma=10", "reg.d_every=2"],
    "r3gan": ["model.arch=r3gan", "model.r3gan.preset=tiny", "train.loss=rpgan", "reg.r1_gamma=2",
              "reg.r2_gamma=2", "reg.d_every=1"],
}


def train(family: str, checkpointing: str, steps: int = 2, early_stop: bool = True) -> tuple[dict, object]:
    """`steps` iterations in one process; the final state_dicts of G and D, and the strategy.
    `early_stop=False`: every recomputation runs its unit's forward to the end (torch stops it
    after the last saved tensor by default), side effects after that point included."""
    cfg = load_config(None, [*COMMON, *FAMILIES[family], f"{KEY}={checkpointing}"])
    strategy = build_strategy(INFO, cfg)
    recipe, spec, _ = setup_models(strategy, cfg, seed=3)
    gen = torch.Generator().manual_seed(5)
    with torch.utils.checkpoint.set_checkpoint_early_stop(early_stop):
        for step in range(steps):
            batches = step_batches(cfg, spec, step, 0, 1, lambda: torch.rand(4, 1, 32, 32, generator=gen) * 2 - 1,
                                   INFO.device)
            train_step(strategy, recipe, batches, step)
    state = {n: {k: v.detach().clone() for k, v in strategy.raw[n].state_dict().items()} for n in ("G", "D")}
    return state, strategy


@pytest.mark.parametrize("family", list(FAMILIES))
def test_weights_and_buffers_equal_without_checkpointing_bitwise(family):
    steps = 2  # step 0 runs every phase (lazy R1 and path length due), step 1 the plain ones
    plain, plain_strategy = train(family, "false", steps)
    # StyleGAN2: G's mapping network updates w_avg after its last saved tensor; full recomputations
    # would update it again if the mapping network were checkpointed
    ckpt, strategy = train(family, "true", steps, early_stop=family != "stylegan2")
    # the feature is on: every checkpointable block of both models (StyleGAN2's G mapping is not)
    for name in ("G", "D"):
        flags = [is_checkpointed(u) for u in strategy.shard_units(strategy.raw[name])]
        assert sum(flags) >= 3, (name, flags)
        assert not any(is_checkpointed(u) for u in plain_strategy.raw[name].modules())
    if family == "stylegan2":
        assert not is_checkpointed(strategy.raw["G"].mapping)  # its w_avg update must happen once
    init, _ = train(family, "false", steps=0)
    for name in ("G", "D"):
        assert plain[name].keys() == ckpt[name].keys()
        for key, value in plain[name].items():
            # parameters, BatchNorm statistics (updated once per forward), StyleGAN2's w_avg
            assert torch.equal(value, ckpt[name][key]), f"{family} {name}.{key} differs with checkpointing"
        assert any(not torch.equal(v, init[name][k]) for k, v in plain[name].items()), "nothing trained"
    if family == "dcgan":
        bn = strategy.raw["D"].blocks[1][1]
        # Dmain (real, fake) and Gmain run D: three forwards per step, each counted once
        assert bn.num_batches_tracked.item() == 3 * steps


def saved_bytes(D, x: torch.Tensor) -> int:
    """Bytes autograd keeps for D's backward after one forward, each storage once, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in D.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        D(x).sum().backward()
    return sum(saved.values())


@pytest.mark.parametrize("family", ["stylegan2", "r3gan"])
def test_d_saves_less_activation_memory(family):
    sizes = {}
    for flag in ("false", "D"):
        cfg = load_config(None, [*COMMON, *FAMILIES[family], f"{KEY}={flag}"])
        strategy = build_strategy(INFO, cfg)
        setup_models(strategy, cfg, seed=3)
        x = torch.rand(4, 1, 32, 32).requires_grad_(True)
        sizes[flag] = saved_bytes(strategy.D, x)
        assert flag == "false" or not any(is_checkpointed(m) for m in strategy.raw["G"].modules())  # "D": D only
    # what stays is each block's input (and the few tensors outside the blocks)
    assert sizes["D"] < 0.35 * sizes["false"], sizes


def test_state_dict_keys_unchanged_and_interchangeable():
    plain, _ = train("stylegan2", "false", steps=0)
    cfg = load_config(None, [*COMMON, *FAMILIES["stylegan2"], f"{KEY}=true"])
    strategy = build_strategy(INFO, cfg)
    setup_models(strategy, cfg, seed=4)
    for name in ("G", "D"):
        assert list(strategy.raw[name].state_dict()) == list(plain[name])
        strategy.raw[name].load_state_dict(plain[name])  # strict: a plain checkpoint loads


@pytest.mark.parametrize("value", ["always", "G,E", "", "[]", "1"])
def test_bad_values_are_refused_naming_the_key(value):
    with pytest.raises(ConfigError, match=KEY.replace(".", r"\.")):
        load_config(None, [f"{KEY}={value}"])


def test_accepted_values():
    from gan_dist.parallel.checkpointing import checkpointed_models

    for value, models in ((False, ()), (True, ("G", "D")), ("D", ("D",)), ("G", ("G",)), ("D,G", ("G", "D")),
                          (["G", "D"], ("G", "D"))):
        assert checkpointed_models(value) == models
    assert load_config(None, [f"{KEY}=[G,D]"]).train.activation_checkpointing == ["G", "D"]


def test_compile_is_refused_naming_both_keys():
    with pytest.raises(ConfigError, match=r"train\.activation_checkpointing.*train\.compile"):
        load_config(None, [f"{KEY}=true", "train.compile=true"])


def test_zero3_is_refused_naming_both_keys():
    """ZeRO-3's per-sub-module hooks break on a recomputation (gan_dist/parallel/checkpointing.py)."""
    with pytest.raises(ConfigError, match=r"train\.activation_checkpointing.*parallel\.deepspeed\.zero_stage=3"):
        load_config(None, [f"{KEY}=D", "parallel.strategy=deepspeed", "parallel.deepspeed.zero_stage=3"])
    load_config(None, [f"{KEY}=D", "parallel.strategy=deepspeed", "parallel.deepspeed.zero_stage=2"])


@pytest.mark.multiproc
@pytest.mark.timeout(600)
# (DDP and ZeRO-2 pass the same comparison; one 2-process job here for the CI's time)
@pytest.mark.parametrize("strategy", [("fsdp",)], ids=["fsdp"])
def test_two_sharded_ranks_with_checkpointing_equal_one_process(tmp_path, strategy):
    """StyleGAN2 with lazy R1 and path length (double backward through D and G, the sharded
    blocks kept gathered for the penalty phases): 2 ranks with batch 4 each and checkpointing
    end where one process with batch 8 and no checkpointing ends."""
    from tests.workers import sharded_worker

    args = ("--model", "stylegan2", "--global-batch", "8", "--iters", "3", "--r1", "10", "--d-every", "2",
            "--pl-every", "2")

    def job(name: str, world_size: int, *extra: str) -> dict:
        out = tmp_path / f"{name}-{{rank}}.pt"
        run_ranks([str(REPO / "tests" / "workers" / "per_rank.py"), sharded_worker.__file__, "--out", str(out),
                   *args, *extra], world_size, timeout=500)
        return torch.load(tmp_path / f"{name}-0.pt", weights_only=True)

    one = job("one", 1, "--strategy", "none")
    two = job("two", 2, "--strategy", *strategy, "--set", f"{KEY}=true")
    G, D = build_models(load_config(None, ["model.arch=stylegan2", *STYLEGAN2_TINY]).model, seed=3)
    init = {"G": G.state_dict(), "D": D.state_dict()}
    moved = 0.0
    for name in ("G", "D"):
        assert one[name].keys() == two[name].keys()
        for key, value in one[name].items():
            torch.testing.assert_close(two[name][key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}.{key}: {m}")
            moved = max(moved, (value - init[name][key]).abs().max().item())
    assert moved > 5e-4, "training hardly moved the weights: the comparison would prove nothing"
