"""EMA of the generator: the half-life/ramp-up formula, exact swapping, and equality of the
averages computed under DDP and FSDP (2 real gloo processes) with a one-process computation."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from gan_dist.config import load_config
from gan_dist.distributed import DistInfo
from gan_dist.ema import EMA, build_ema, ema_beta
from gan_dist.build import setup_models
from gan_dist.models import build_models
from gan_dist.parallel import build_strategy
from tests._mp import PYTHON, REPO, run, run_ranks

WORKER = str(REPO / "tests" / "workers" / "eval_ema_worker.py")
PER_RANK = str(REPO / "tests" / "workers" / "per_rank.py")
TINY_MODEL = ["train.precision=fp32", "model.dcgan.norm=batch", "model.resolution=32", "model.channels=1", "model.dcgan.ngf=8", "model.dcgan.ndf=8", "model.dcgan.nz=16"]


def one_process_strategy(*overrides: str):
    info = DistInfo(0, 1, 0, 1, 0, torch.device("cpu"), None, "python")
    cfg = load_config(None, [*TINY_MODEL, *overrides])
    strategy = build_strategy(info, cfg)
    recipe, _, _ = setup_models(strategy, cfg, seed=3)
    return strategy, cfg


# ---- the formula --------------------------------------------------------------------------------
def test_beta_halves_the_weight_of_the_past_every_half_life():
    # no ramp-up: after updates covering exactly one half-life, the old weights keep half the mass
    beta = ema_beta(batch_nimg=100, cur_nimg=10**6, half_life_kimg=2.0, rampup=None)
    assert beta ** (2000 / 100) == pytest.approx(0.5, rel=1e-12)
    # ramp-up: the half-life is rampup x images seen, until it reaches half_life_kimg
    assert ema_beta(64, 10_000, 10.0, 0.05) == pytest.approx(0.5 ** (64 / 500))
    assert ema_beta(64, 10**7, 10.0, 0.05) == pytest.approx(0.5 ** (64 / 10_000))
    # at the first step the average is the weights themselves
    assert ema_beta(64, 0, 10.0, 0.05) == 0.0
    assert ema_beta(64, 1000, 0.0, None) == 0.0


def test_ema_of_a_step_change_after_one_half_life_is_one_half():
    strategy, _ = one_process_strategy()
    G = strategy.raw["G"]
    with torch.no_grad():
        for p in G.parameters():
            p.zero_()
    ema = EMA(strategy, half_life_kimg=0.32, rampup=None)  # 320 images
    with torch.no_grad():
        for p in G.parameters():
            p.fill_(1.0)
    nimg = 0
    for _ in range(10):  # 10 x 32 images = one half-life
        ema.update(nimg, 32)
        nimg += 32
    for s in ema.shadow:
        torch.testing.assert_close(s, torch.full_like(s, 0.5), rtol=0, atol=1e-6)
    strategy.close()


def test_swapped_holds_the_average_inside_and_restores_the_weights_exactly():
    strategy, _ = one_process_strategy()
    G = strategy.raw["G"]
    ema = EMA(strategy, half_life_kimg=0.01, rampup=None)
    with torch.no_grad():
        for p in G.parameters():
            p.add_(torch.randn_like(p))
    ema.update(10_000, 16)
    weights = {k: v.clone() for k, v in G.state_dict().items()}
    param_ids = [id(p) for p in G.parameters()]
    with ema.swapped() as module:
        assert module is G
        for (name, p), s in zip(G.named_parameters(), ema.shadow):
            assert torch.equal(p, s), name
        assert not all(torch.equal(p, weights[n]) for n, p in G.named_parameters())
    for k, v in G.state_dict().items():
        assert torch.equal(v, weights[k]), k  # bit for bit, buffers included
    assert [id(p) for p in G.parameters()] == param_ids  # the optimizer's parameters are the same objects
    strategy.close()


def test_state_dict_round_trip_and_clear_errors():
    strategy, _ = one_process_strategy()
    ema = EMA(strategy, 0.01, None)
    with torch.no_grad():
        for p in strategy.raw["G"].parameters():
            p.mul_(2)
    ema.update(1000, 8)
    state = ema.state_dict()
    assert set(state["params"]) == {n for n, _ in strategy.raw["G"].named_parameters()}
    other = EMA(strategy, 0.01, None)
    assert not all(torch.equal(a, b) for a, b in zip(other.shadow, ema.shadow))
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(other.shadow, ema.shadow))
    assert other.num_updates == 1
    bad = {**state, "params": {k: v[..., :1] for k, v in state["params"].items()}}
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict(bad)
    with pytest.raises(ValueError, match="lacks parameters"):
        other.load_state_dict({**state, "params": {}})
    strategy.close()


def test_build_ema_follows_the_config():
    strategy, cfg = one_process_strategy("ema.enabled=false")
    assert build_ema(strategy, cfg.ema) is None
    cfg = load_config(None, ["ema.half_life_kimg=2.5", "ema.rampup=null"])
    ema = build_ema(strategy, cfg.ema)
    assert ema.half_life_kimg == 2.5 and ema.rampup is None
    strategy.close()


# ---- distributed: the same average as one process ----------------------------------------------
def job(tmp_path, world_size: int, name: str, *args: str) -> list[dict]:
    if world_size == 1:
        out = tmp_path / f"{name}-0.pt"
        run([PYTHON, WORKER, "--out", str(out), *args], timeout=240)
        return [torch.load(out, weights_only=True)]
    run_ranks([PER_RANK, WORKER, "--out", str(tmp_path / f"{name}-{{rank}}.pt"), *args], world_size, timeout=240)
    return [torch.load(tmp_path / f"{name}-{r}.pt", weights_only=True) for r in range(world_size)]


def replay_float64(initial: dict, history: list[dict], names: list[str], betas: list[float]) -> dict:
    """The EMA recursion, computed independently in float64 from the recorded full weights."""
    avg = {n: initial[n].double() for n in names}
    for weights, beta in zip(history, betas):
        avg = {n: beta * avg[n] + (1 - beta) * weights[n].double() for n in names}
    return avg


def replay_one_process(history: list[dict], half_life_kimg: float, rampup, global_batch: int) -> EMA:
    """The EMA class itself, in one process, fed the same sequence of weights."""
    strategy, _ = one_process_strategy()
    ema = EMA(strategy, half_life_kimg, rampup)
    G = strategy.raw["G"]
    nimg = 0
    for weights in history:
        G.load_state_dict(weights)
        ema.update(nimg, global_batch)
        nimg += global_batch
    return ema


def initial_weights() -> dict:
    cfg = load_config(None, TINY_MODEL)
    G, _ = build_models(cfg.model, seed=3)
    return G.state_dict()


def check_against_one_process(r0: dict, half_life: float, rampup) -> None:
    names = r0["names"]
    history = r0["history"]
    assert len(history) == len(r0["betas"]) and all(h is not None for h in history)
    expected = replay_float64(initial_weights(), history, names, r0["betas"])
    replay = replay_one_process(history, half_life, rampup, r0["global_batch"])
    for n, s in zip(names, replay.shadow):
        full = r0["state"]["params"][n]
        torch.testing.assert_close(full.double(), expected[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")
        # same operations on the same numbers: equal to the last bit
        assert torch.equal(full, s), f"{n}: distributed EMA differs from the one-process EMA"
        # the exported EMA generator and the swapped-in weights are the same average
        assert torch.equal(r0["exported"][n].float(), full), n
        assert torch.equal(r0["inside"][n].float(), full), n
    for k, v in r0["before"].items():
        assert torch.equal(v, r0["after"][k]), f"{k}: training weights not restored after swapped()"
        if k not in names:  # buffers: the live generator's, in the export too
            assert torch.equal(r0["exported"][k], v), k
    # inside swapped(), the strategy's sampling module makes the exported EMA generator's images
    G, _ = build_models(load_config(None, TINY_MODEL).model, seed=0)
    G.load_state_dict(r0["exported"])
    with torch.no_grad():
        expected_images = G.eval()(r0["z"])
    torch.testing.assert_close(r0["images"], expected_images, rtol=1e-4, atol=1e-5)
    # the average really differs from the last weights (a non-trivial test)
    assert any(not torch.equal(r0["exported"][n], history[-1][n]) for n in names)


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_ddp_ema_with_rampup_equals_one_process_ema(tmp_path):
    r0, r1 = job(tmp_path, 2, "ddp", "--strategy", "ddp", "--steps", "4", "--half-life-kimg", "0.05",
                 "--rampup", "0.5")
    assert r0["strategy"] == "ddp" and not r0["sharded"]
    for a, b in zip(r0["shadow"], r1["shadow"]):
        assert torch.equal(a, b)
    betas = r0["betas"]  # the ramp-up shortens the first half-lives: beta grows over the steps
    assert betas[0] == 0.0 and all(b1 > b0 for b0, b1 in zip(betas[1:], betas[2:]))
    check_against_one_process(r0, 0.05, 0.5)


STRATEGIES = [
    pytest.param("ddp", [], id="ddp"),
    pytest.param("fsdp", [], id="fsdp", marks=pytest.mark.skipif(not has_module("gan_dist.parallel.fsdp"),
                                                                 reason="no FSDP strategy")),
    pytest.param("deepspeed", ["--zero-stage", "3"], id="deepspeed-zero3",
                 marks=pytest.mark.skipif(not has_module("deepspeed"), reason="deepspeed is not installed")),
]


@pytest.mark.multiproc
@pytest.mark.timeout(400)
@pytest.mark.parametrize("strategy,extra", STRATEGIES)
def test_distributed_ema_equals_one_process_ema_and_sampling_it_leaves_training_unchanged(tmp_path, strategy, extra):
    common = ["--strategy", strategy, *extra, "--steps", "4", "--half-life-kimg", "0.05"]
    r0, r1 = job(tmp_path, 2, "swap", *common, "--swap-every-step")
    assert r0["strategy"] == strategy
    if r0["sharded"]:
        # each rank averages only its shards: together they cover every parameter once (plus padding)
        params = sum(r0["state"]["params"][n].numel() for n in r0["names"])
        held = [sum(s.numel() for s in r["shadow"]) for r in (r0, r1)]
        assert params <= sum(held) < params + 2 * len(r0["names"]) and max(held) < params
        # the full state is on rank 0; the other ranks only contribute their shards
        assert r1["state"]["params"] is None and r1["exported"] is None
    else:
        for a, b in zip(r0["shadow"], r1["shadow"]):  # every rank holds the same average
            assert torch.equal(a, b)
    check_against_one_process(r0, 0.05, None)
    # sampling from the EMA after every step (as evaluations do) changes nothing in training
    plain = job(tmp_path, 2, "plain", *common)[0]
    for k, v in plain["before"].items():
        assert torch.equal(v, r0["before"][k]), k
    for n in r0["names"]:
        assert torch.equal(plain["state"]["params"][n], r0["state"]["params"][n]), n


def test_ema_state_is_restored_into_shards_from_a_full_state(tmp_path):
    """load_state_dict keeps each rank's part of full tensors (here: one process, whole tensors)."""
    strategy, _ = one_process_strategy()
    ema = EMA(strategy, 0.01, None)
    full = {n: torch.randn_like(p) for n, p in strategy.raw["G"].named_parameters()}
    ema.load_state_dict({"format": 1, "num_updates": 7, "params": full})
    for n, s in zip(ema.names, ema.shadow):
        assert torch.equal(s, full[n].float())
    assert ema.num_updates == 7
    strategy.close()


@pytest.mark.timeout(400)
def test_generator_ema_after_a_resume_is_bitwise_the_uninterrupted_one(tmp_path):
    """The EMA travels in the checkpoint: 3 steps + resume to 6 gives the EMA of 6 straight steps."""
    import hashlib

    from tests.conftest import TINY

    args = [*TINY, "eval.enabled=false", "ema.half_life_kimg=0.02", "ema.rampup=null"]

    def train(run_dir, steps):
        run([PYTHON, "-m", "gan_dist.train", *args, f"run.dir={run_dir}", f"train.steps={steps}"],
            timeout=240, cwd=REPO)

    def sha(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    train(tmp_path / "straight", 6)
    train(tmp_path / "resumed", 3)
    three = sha(tmp_path / "resumed" / "generator_ema.pt")
    train(tmp_path / "resumed", 6)
    assert sha(tmp_path / "resumed" / "generator_ema.pt") != three
    assert sha(tmp_path / "resumed" / "generator_ema.pt") == sha(tmp_path / "straight" / "generator_ema.pt")
    assert sha(tmp_path / "straight" / "generator_ema.pt") != sha(tmp_path / "straight" / "generator.pt")
    disabled = tmp_path / "no_ema"
    run([PYTHON, "-m", "gan_dist.train", *args, f"run.dir={disabled}", "train.steps=1", "ema.enabled=false"],
        timeout=240, cwd=REPO)
    assert (disabled / "generator.pt").is_file() and not (disabled / "generator_ema.pt").exists()
