"""benchmarks/memory.py counts what each rank really holds: DDP the whole model, FSDP half."""
from __future__ import annotations

import json

import pytest

from tests._mp import PYTHON, REPO, base_env, run

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(600)]


def test_memory_benchmark_counts_whole_and_sharded_state(tmp_path):
    out = tmp_path / "memory.json"
    run([PYTHON, str(REPO / "benchmarks" / "memory.py"), "--strategies", "ddp,fsdp", "--world-sizes", "2",
         "--set", "model.dcgan.ngf=16", "--set", "model.dcgan.ndf=16", "--json", str(out), "--md", str(tmp_path / "m.md")],
        timeout=500, env=base_env(), cwd=REPO)
    result = json.loads(out.read_text())
    rows = {r["strategy"]: r for r in result["rows"]}
    numel = rows["ddp"]["params_G"] + rows["ddp"]["params_D"]
    ddp, fsdp = rows["ddp"], rows["fsdp"]
    assert (ddp["ran"], fsdp["ran"], ddp["world_size"]) == ("ddp", "fsdp", 2)
    # fp32 Adam under DDP: parameters, gradients, and two moments, all whole
    assert ddp["params_bytes"] == ddp["grads_bytes"] == 4 * numel
    assert 8 * numel <= ddp["optimizer_bytes"] < 8 * numel + 1024  # + Adam's step counters
    assert ddp["master_bytes"] == 0
    # FSDP on 2 ranks: about half of each (shards are padded to equal rows)
    for key in ("params_bytes", "grads_bytes", "optimizer_bytes"):
        assert 0.45 <= fsdp[key] / ddp[key] <= 0.55, (key, fsdp[key], ddp[key])
    target = result["targets"][0]["results"]["fsdp"]
    assert target["met"] and target["vs_ddp"] == fsdp["vs_ddp"]
    assert "| fp32 | 2 | fsdp (fsdp) |" in (tmp_path / "m.md").read_text()


def test_memory_benchmark_takes_a_config_and_counts_its_ema_and_phases(tmp_path):
    """--config: the family's recipe (StyleGAN2: four phases, two of them second order) and the
    fp32 EMA of G, whole under DDP and the rank's shard under FSDP."""
    out = tmp_path / "memory.json"
    run([PYTHON, str(REPO / "benchmarks" / "memory.py"), "--config", "configs/stylegan2_digits.yaml",
         "--strategies", "ddp,fsdp", "--world-sizes", "2", "--json", str(out), "--md", str(tmp_path / "m.md")],
        timeout=500, env=base_env(), cwd=REPO)
    rows = {r["strategy"]: r for r in json.loads(out.read_text())["rows"]}
    ddp, fsdp = rows["ddp"], rows["fsdp"]
    assert ddp["ema_bytes"] == 4 * ddp["params_G"]
    assert 0.45 <= fsdp["ema_bytes"] / ddp["ema_bytes"] <= 0.55
    phases = [(p["model"], p["second_order"]) for p in ddp["phases"]]
    assert phases == [("D", False), ("D", True), ("G", False), ("G", True)]
    assert all(p["saved_bytes"] > 0 for r in (ddp, fsdp) for p in r["phases"])
    assert "| D | D 2nd order | G | G 2nd order |" in (tmp_path / "m.md").read_text()
