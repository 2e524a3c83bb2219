"""R1 and R2 penalties (lazy every k steps, or in Dmain's backward) under every strategy: two
processes with batch b end with the weights of one process with batch 2b, and each update reduces
its model's gradients once, with no reduction of D while G trains.

Real gloo processes (tests/workers/sharded_worker.py), plain SGD and no BatchNorm (fp32), so
that any difference in how a penalty's gradient is scaled, reduced or lost shows in the weights.
"""
from __future__ import annotations

import json

import pytest
import torch

from tests._mp import REPO, run_ranks
from tests.test_sharded_exact import REDUCING, assert_same_weights

WORKER = str(REPO / "tests" / "workers" / "sharded_worker.py")
pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(900)]

# 3 iterations with the lazy phase due at iterations 0 and 2; the collectives of iteration 0
LAZY = ("--global-batch", "8", "--iters", "3", "--count-iter", "0", "--r1", "1000", "--r2", "500",
        "--d-every", "2", "--loss", "rpgan")
EVERY_STEP = ("--global-batch", "8", "--iters", "3", "--count-iter", "0", "--r1", "1000", "--r2", "500",
              "--d-every", "1", "--loss", "hinge")
STRATEGIES = {"ddp": ("--strategy", "ddp"), "fsdp": ("--strategy", "fsdp"),
              **{f"zero{s}": ("--strategy", "deepspeed", "--zero-stage", str(s)) for s in (1, 2, 3)},
              # every parameter partitioned (this small a model would otherwise stay whole)
              "zero3_all": ("--strategy", "deepspeed", "--ds-config", "{zero3_all}")}


def job(tmp_path, name: str, world_size: int, *args: str) -> list[dict]:
    out = tmp_path / f"{name}-{{rank}}.pt"
    if "{zero3_all}" in args:
        conf = json.loads((REPO / "configs" / "deepspeed" / "zero3.json").read_text())
        conf["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        (tmp_path / "zero3_all.json").write_text(json.dumps(conf))
        args = tuple(str(tmp_path / "zero3_all.json") if a == "{zero3_all}" else a for a in args)
    run_ranks([str(REPO / "tests" / "workers" / "per_rank.py"), WORKER, "--out", str(out), *args],
              world_size, timeout=900)
    return [torch.load(tmp_path / f"{name}-{r}.pt", weights_only=True) for r in range(world_size)]


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict:
    """One process with the whole batch: no distribution at all."""
    tmp = tmp_path_factory.mktemp("one")
    return {"lazy": job(tmp, "lazy", 1, "--strategy", "none", *LAZY)[0],
            "every": job(tmp, "every", 1, "--strategy", "none", *EVERY_STEP)[0]}


def updates(run: dict) -> dict[str, int]:
    """Elements reduced per update (D0, D1, G0, ...) of the counted iteration, phases only."""
    out: dict[str, int] = {}
    for update, label, name, n in run["collectives_by_update"]:
        if label.endswith("-phase") and name in REDUCING:
            out[update] = out.get(update, 0) + n
    return out


def assert_each_update_reduces_its_model_once(run: dict, d_updates: int) -> None:
    nG, nD = run["numel"]["G"], run["numel"]["D"]
    per_update = updates(run)
    d_keys = sorted(k for k in per_update if k.startswith("D"))
    assert len(d_keys) == d_updates, per_update
    for k in d_keys:  # shard padding is far below the other model's size
        assert nD <= per_update[k] < nD + nG / 2, (k, per_update, nG, nD)
    assert nG <= per_update["G0"] < nG + nD / 2, (per_update, nG, nD)
    assert not any(run["d_grads_in_g_phase"]), "the G phase left gradients on D"


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_lazy_r1_r2_equal_one_process_and_reduce_once(tmp_path, references, name):
    r0, r1 = job(tmp_path, name, 2, *STRATEGIES[name], *LAZY)
    assert_same_weights(r0, references["lazy"])
    for r in (r0, r1):
        assert_each_update_reduces_its_model_once(r, d_updates=2)  # Dmain and Dreg


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_penalties_in_dmain_equal_one_process_and_reduce_once(tmp_path, references, name):
    r0, r1 = job(tmp_path, name, 2, *STRATEGIES[name], *EVERY_STEP)
    assert_same_weights(r0, references["every"])
    for r in (r0, r1):
        assert_each_update_reduces_its_model_once(r, d_updates=1)  # the penalties ride in Dmain


def test_penalties_change_the_weights(tmp_path, references):
    """The comparisons above would prove nothing if the penalty had no effect."""
    plain = job(tmp_path, "plain", 1, "--strategy", "none", "--global-batch", "8", "--iters", "3",
                "--loss", "rpgan")[0]
    diff = max((plain["D"][k] - references["lazy"]["D"][k]).abs().max().item() for k in plain["D"])
    assert diff > 1e-3, f"R1/R2 hardly changed D ({diff})"


def test_matmul_convs_give_the_native_penalty_gradients(tmp_path):
    """The CPU speed path (convolutions as matmuls) differentiates twice like the native kernels."""
    runs = {m: job(tmp_path, m, 1, "--strategy", "none", "--matmul-conv", m, *EVERY_STEP)[0]
            for m in ("always", "never")}
    assert_same_weights(runs["always"], runs["never"])
