"""FSDP2 and DeepSpeed ZeRO in the alternating loop are DDP, sharded: same weights, the same one
reduction per model and update, no reduction of D in the G phase, and state really split.

Real gloo processes (tests/workers/sharded_worker.py); collectives are counted by wrapping the
functions of torch.distributed, which still run on the real process group.
"""
from __future__ import annotations

import json

import pytest
import torch

from gan_dist.config import load_config
from gan_dist.models import build_models
from tests._mp import REPO, run_ranks

WORKER = str(REPO / "tests" / "workers" / "sharded_worker.py")
REDUCING = {"all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single",
            "_reduce_scatter_base", "all_reduce_coalesced"}
pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(600)]

# one iteration, SGD, no BatchNorm: any difference in gradient scaling shows in the weights
PLAIN = ("--global-batch", "8", "--iters", "3", "--count-iter", "1")
# accumulation, several D steps, BatchNorm, Adam (sharded moments), FSDP keeping gathered blocks
ACCUM = ("--global-batch", "16", "--iters", "2", "--accum", "2", "--d-steps", "2", "--norm", "batch",
         "--optim", "adam")


def job(tmp_path, name: str, *args: str) -> list[dict]:
    out = tmp_path / f"{name}-{{rank}}.pt"
    run_ranks([str(REPO / "tests" / "workers" / "per_rank.py"), WORKER, "--out", str(out), *args], 2, timeout=400)
    return [torch.load(tmp_path / f"{name}-{r}.pt", weights_only=True) for r in range(2)]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> dict:
    """DDP references, computed once for the module."""
    tmp = tmp_path_factory.mktemp("ddp")
    return {"plain": job(tmp, "plain", "--strategy", "ddp", *PLAIN)[0],
            "accum": job(tmp, "accum", "--strategy", "ddp", *ACCUM)[0]}


def init_weights(norm: str) -> dict:
    cfg = load_config(None, [f"model.dcgan.norm={norm}", "model.resolution=32", "model.channels=1", "model.dcgan.ngf=8", "model.dcgan.ndf=8", "model.dcgan.nz=16"])
    G, D = build_models(cfg.model, seed=3)
    return {"G": G.state_dict(), "D": D.state_dict()}


def assert_same_weights(a: dict, b: dict, norm: str = "none") -> None:
    init = init_weights(norm)
    moved = 0.0
    for model in ("G", "D"):
        assert a[model].keys() == b[model].keys()
        for key, value in a[model].items():
            torch.testing.assert_close(value, b[model][key], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{model}.{key}: {m}")
            if value.is_floating_point():
                moved = max(moved, (value - init[model][key]).abs().max().item())
    # far above the tolerance: a gradient off by any factor would show
    assert moved > 5e-4, "training did not change the weights: the comparison would prove nothing"


def reductions(run: dict, label: str) -> list[int]:
    return [n for lab, name, n in run["collectives"] if lab == label and name in REDUCING]


def assert_one_reduction_per_model(run: dict) -> None:
    """G phase: G's gradients once and no D gradient; D phase: D's once. Padding of the shards
    (a row per parameter at most) is far smaller than the other model, whose gradients would
    add all their elements."""
    nG, nD = run["numel"]["G"], run["numel"]["D"]
    g_phase, d_phase = sum(reductions(run, "G-phase")), sum(reductions(run, "D-phase"))
    assert nG <= g_phase < nG + nD / 2, (g_phase, nG, nD, run["collectives"])
    assert nD <= d_phase < nD + nG / 2, (d_phase, nG, nD, run["collectives"])
    # steps reduce nothing bigger than a flag (the non-finite check agreed across ranks)
    for label in ("G-step", "D-step", "between"):
        assert all(n <= 2 for n in reductions(run, label)), run["collectives"]
    assert not any(run["d_grads_in_g_phase"]), "the G phase left gradients on D"


def test_fsdp_equals_ddp_and_reduces_each_model_once(tmp_path, ddp_runs):
    r0, r1 = job(tmp_path, "fsdp", "--strategy", "fsdp", *PLAIN)
    assert r0["strategy"] == "fsdp" and ddp_runs["plain"]["strategy"] == "ddp"
    assert_same_weights(r0, ddp_runs["plain"])
    assert_one_reduction_per_model(r0)
    assert_one_reduction_per_model(r1)
    # D's parameters are gathered for the G phase's forward and backward, never reduced there
    assert any(lab == "G-phase" and name.startswith("all_gather") for lab, name, _ in r0["collectives"])
    # each rank stores about half of every model (shards are padded to equal rows)
    for r in (r0, r1):
        for model in ("G", "D"):
            assert 0.45 <= r["local_numel"][model] / r["numel"][model] <= 0.56, r["local_numel"]


def test_fsdp_with_accumulation_batchnorm_and_adam_equals_ddp(tmp_path, ddp_runs):
    r0, r1 = job(tmp_path, "fsdp_acc", "--strategy", "fsdp", "--reshard", "false", *ACCUM)
    assert_same_weights(r0, ddp_runs["accum"], norm="batch")
    for model in ("G", "D"):  # Adam's moments are sharded like the parameters
        state = [r["optim_numel"][model]["state"] for r in (r0, r1)]
        assert sum(state) >= 2 * r0["numel"][model] and max(state) <= 0.56 * 2 * r0["numel"][model]


def test_collective_log_catches_a_live_d_in_the_g_phase(tmp_path):
    """The counting above would see a D reduction: with D left live in the G phase, FSDP
    reduce-scatters D's gradients there too."""
    r0, _ = job(tmp_path, "broken", "--strategy", "fsdp", "--break-freeze", *PLAIN)
    assert sum(reductions(r0, "G-phase")) >= r0["numel"]["G"] + r0["numel"]["D"]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_zero_equals_ddp_and_reduces_each_model_once(tmp_path, ddp_runs, stage):
    r0, r1 = job(tmp_path, f"zero{stage}", "--strategy", "deepspeed", "--zero-stage", str(stage), *PLAIN)
    assert r0["strategy"] == "deepspeed"
    assert_same_weights(r0, ddp_runs["plain"])
    assert_one_reduction_per_model(r0)
    assert_one_reduction_per_model(r1)
    for r in (r0, r1):
        for model in ("G", "D"):
            share = r["optim_numel"][model]["params"] / r["numel"][model]
            if stage == 0:
                assert share == 1.0  # no ZeRO: every rank updates everything
            elif stage in (1, 2):  # each rank updates (and keeps fp32 state of) its partition only
                assert 0.45 <= share <= 0.56, (stage, model, share)
            else:  # ZeRO-3 hands its partitions to the optimizer during the step only; it stores them
                assert 0.45 <= r["local_numel"][model] / r["numel"][model] <= 0.56


def test_deepspeed_zero3_with_accumulation_batchnorm_and_adam_equals_ddp(tmp_path, ddp_runs):
    # parameters this small would stay whole under DeepSpeed's default persistence threshold
    conf = json.loads((REPO / "configs" / "deepspeed" / "zero3.json").read_text())
    conf["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path / "zero3.json"
    path.write_text(json.dumps(conf))
    r0, r1 = job(tmp_path, "zero3_acc", "--strategy", "deepspeed", "--ds-config", str(path), *ACCUM)
    assert_same_weights(r0, ddp_runs["accum"], norm="batch")
    for r in (r0, r1):
        assert r["released"] == {"G": True, "D": True}, "ZeRO-3 kept gathered parameters after the step"
        for model in ("G", "D"):
            assert 0.45 <= r["local_numel"][model] / r["numel"][model] <= 0.56
            assert 0.45 * 2 <= r["optim_numel"][model]["state"] / r["numel"][model] <= 0.56 * 2


@pytest.mark.parametrize("strategy", [("fsdp",), ("deepspeed", "--zero-stage", "3")], ids=["fsdp", "zero3"])
def test_sharded_checkpoint_resumes_exactly(tmp_path, strategy):
    """Save after 2 of 4 iterations; a fresh job that loads it ends where the uninterrupted one did."""
    ckpt = tmp_path / "ckpt"
    common = ("--strategy", *strategy, "--global-batch", "8", "--iters", "4", "--save-at", "2",
              "--ckpt", str(ckpt), "--norm", "batch", "--optim", "adam")
    full = job(tmp_path, "full", *common)[0]
    resumed = job(tmp_path, "resumed", *common, "--resume")[0]
    for model in ("G", "D"):
        for key, value in full[model].items():
            assert torch.equal(value, resumed[model][key]), f"{model}.{key} differs after resuming"
    # each rank wrote its own shard
    files = sorted(p.name for p in ckpt.rglob("*") if p.is_file())
    if strategy[0] == "fsdp":
        assert {"__0_0.distcp", "__1_0.distcp"} <= set(files)
    else:
        assert any("optim_states" in f and "rank_1" in f for f in files), files


def _deepspeed_fp16() -> bool:
    try:
        from gan_dist.parallel.deepspeed import fp16_supported
        return fp16_supported()
    except ImportError:
        return False


DS_FP16 = pytest.mark.skipif(not _deepspeed_fp16(), reason="DeepSpeed has no fp16 on this CPU (no AVX512-FP16/AMX-FP16); "
                             "gan_dist refuses the combination (tests/test_sharded_errors.py)")


@pytest.mark.parametrize("strategy", [("fsdp",), pytest.param(("deepspeed", "--zero-stage", "2"), marks=DS_FP16)],
                         ids=["fsdp", "zero2"])
def test_fp16_with_dynamic_loss_scale_trains_and_ranks_agree(tmp_path, strategy):
    """The scale starts at 2**16, backs off on overflowing updates (skipped on every rank alike)
    and the remaining updates train."""
    iters = 8
    r0, r1 = job(tmp_path, "fp16", "--strategy", *strategy, "--precision", "fp16", "--optim", "adam",
                 "--norm", "batch", "--iters", str(iters), "--global-batch", "8")
    for model in ("G", "D"):
        assert r0["loss_scale"][model] == r1["loss_scale"][model] < 2.0 ** 16, (r0["loss_scale"], r1["loss_scale"])
        assert r0["skipped"][model] == r1["skipped"][model] < iters, r0["skipped"]
        assert all(torch.isfinite(v).all() for v in r0[model].values())
    init = init_weights("batch")
    assert any(not torch.equal(v, init["G"][k]) for k, v in r0["G"].items() if v.is_floating_point())
