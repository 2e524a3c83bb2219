"""python -m gan_dist.plan against reality: at world size 2 its per-rank bytes equal what
benchmarks/memory.py counts in 2 real gloo processes, and its collectives (operation, phase,
elements) equal the collective log of tests/workers/sharded_worker.py on 2 real processes; it
reaches 4096 simulated ranks; bad input is one error naming the argument (exit 2)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tests._mp import PYTHON, REPO, base_env, run, run_ranks

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(1200)]

# the tiny model of the exactness tests (tests/workers/sharded_worker.py), Adam, fp32
MODEL = {"model.resolution": "32", "model.channels": "1", "model.dcgan.ngf": "8", "model.dcgan.ndf": "8",
         "model.dcgan.nz": "16", "model.dcgan.norm": "none", "train.precision": "fp32"}
OVERRIDES = [f"{k}={v}" for k, v in MODEL.items()]
GLOBAL_BATCH = 8
STRATEGIES = {"ddp": ["--strategy", "ddp"], "fsdp": ["--strategy", "fsdp"],
              "zero3": ["--strategy", "deepspeed", "--zero-stage", "3"]}


def planner(tmp_path, *args: str, check: bool = True, timeout: float = 900):
    out = tmp_path / "plan.json"
    proc = run([PYTHON, "-m", "gan_dist.plan", *OVERRIDES, *args, "--json", str(out), "--md", str(tmp_path / "plan.md")],
               timeout=timeout, env=base_env(threads=2), cwd=REPO, check=check)
    return proc, (json.loads(out.read_text()) if proc.returncode == 0 else None)


@pytest.fixture(scope="module")
def plan_at_two(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("plan2")
    _, result = planner(tmp, "--gpus", "2", "--strategy", ",".join(STRATEGIES), "--batch-size", str(GLOBAL_BATCH),
                        "--plot", str(tmp / "plan.png"))
    assert (tmp / "plan.png").stat().st_size > 0
    return {r["strategy"]: r for r in result["rows"]}


def test_bytes_per_rank_equal_the_memory_benchmark(plan_at_two, tmp_path):
    out = tmp_path / "memory.json"
    run([PYTHON, str(REPO / "benchmarks" / "memory.py"), "--strategies", ",".join(STRATEGIES), "--world-sizes", "2",
         "--batch-size", str(GLOBAL_BATCH // 2), *(f"--set={o}" for o in OVERRIDES if not o.startswith("train.")),
         "--precision", "fp32", "--json", str(out)], timeout=900, env=base_env(), cwd=REPO)
    measured = {r["strategy"]: r for r in json.loads(out.read_text())["rows"]}
    for name in STRATEGIES:
        planned, real = plan_at_two[name], measured[name]
        assert planned["method"].startswith("simulated"), planned["method"]
        assert (planned["params_G"], planned["params_D"]) == (real["params_G"], real["params_D"])
        for key in ("params_bytes", "grads_bytes", "optimizer_bytes", "master_bytes"):
            # rank 0's bytes in the plan; the benchmark reports its largest rank, so compare rank 0's
            rank0 = next(r for r in real["ranks"] if r["rank"] == 0)
            assert planned[key] == rank0[key], (name, key, planned[key], rank0[key])
    # the comparison can fail: FSDP on 2 ranks holds about half of DDP's state
    assert plan_at_two["fsdp"]["params_bytes"] < 0.6 * plan_at_two["ddp"]["params_bytes"]


def test_collectives_equal_the_logs_of_two_real_processes(plan_at_two, tmp_path):
    for name, args in STRATEGIES.items():
        out = tmp_path / f"{name}-{{rank}}.pt"
        run_ranks([str(REPO / "tests" / "workers" / "per_rank.py"), str(REPO / "tests" / "workers" / "sharded_worker.py"),
                   "--out", str(out), *args, "--optim", "adam", "--global-batch", str(GLOBAL_BATCH), "--iters", "2",
                   "--count-iter", "1"], 2, timeout=500)
        logged = torch.load(tmp_path / f"{name}-0.pt", weights_only=True)["collectives"]
        planned = [(c["label"], c["op"], c["numel"]) for c in plan_at_two[name]["collectives"]]
        assert planned == [tuple(c) for c in logged], (name, planned, logged)
        # and the bytes the plan prices are those elements in fp32 (the gradients, the parameters
        # and the 4-byte non-finite flag); DeepSpeed adds int64 broadcasts and overflow flags
        priced = [c for c in plan_at_two[name]["collectives"]
                  if name != "zero3" or c["op"].startswith(("reduce_scatter", "all_gather"))]
        assert priced and all(c["bytes"] == 4 * c["numel"] for c in priced), name
    # each rank of a 2-rank ring all-reduce sends the bucket once: DDP sends its gradients' bytes
    ddp = plan_at_two["ddp"]
    grads = 4 * (ddp["params_G"] + ddp["params_D"])
    assert ddp["sent_bytes_per_iteration"] == pytest.approx(grads + 2 * 4)


def test_reaches_4096_ranks_with_shards_of_one_4096th(tmp_path):
    _, result = planner(tmp_path, "--gpus", "8,4096", "--strategy", "ddp,fsdp", "--batch-size", "4096",
                        "--compute-ms", "10")
    rows = {(r["world_size"], r["strategy"]): r for r in result["rows"]}
    assert rows[(4096, "fsdp")]["per_rank_batch"] == 1 and rows[(8, "fsdp")]["per_rank_batch"] == 512
    # DDP's whole state does not shrink; FSDP2 keeps ceil(rows / N) rows of each parameter
    assert rows[(4096, "ddp")]["params_bytes"] == rows[(8, "ddp")]["params_bytes"]
    from gan_dist.config import load_config
    from gan_dist.models import model_spec

    spec = model_spec(load_config(None, OVERRIDES).model)
    with torch.device("meta"):
        G, D = spec.build(0)
    shards = sum(4 * math.ceil(p.shape[0] / 4096) * (p.numel() // p.shape[0]) for m in (G, D) for p in m.parameters())
    assert rows[(4096, "fsdp")]["params_bytes"] == shards
    # the ring crosses nodes at 4096: every collective goes at the inter-node bandwidth
    assert rows[(4096, "fsdp")]["comm_ms"] > rows[(8, "fsdp")]["comm_ms"]


@pytest.mark.parametrize("args, named", [
    (["--gpus", "64", "--batch-size", "32"], "--batch-size 32 cannot feed --gpus 64"),
    (["--gpus", "8", "--link", "nvlink:fast"], "--link"),
    (["--gpus", "8", "--strategy", "ddp,megatron"], "--strategy"),
])
def test_bad_input_is_one_error_naming_the_argument(tmp_path, args, named):
    proc, _ = planner(tmp_path, *args, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert named in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
