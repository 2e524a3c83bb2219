"""The reference-settings StyleGAN2 configs (FFHQ 256 and 1024) start on a CPU: real shards of
their resolution, the real entry point, two iterations at batch 2 (the first runs all four phases:
Dmain, Dreg, Gmain, Greg), full widths, and run_info.json records the networks' sizes."""
from __future__ import annotations

import json

import pytest
import torch

from tests._mp import PYTHON, REPO, run
from tests.test_stylegan2 import expected_counts
from tests.workers.data_shards import make_shards

TRAIN = str(REPO / "gan_dist" / "train.py")
pytestmark = pytest.mark.timeout(1500)


@pytest.mark.slow
@pytest.mark.parametrize("name,R,base", [("stylegan2_256", 256, 16384), ("stylegan2_1024", 1024, 32768)])
def test_reference_config_starts_on_a_cpu(tmp_path, name, R, base):
    urls, _ = make_shards(tmp_path / "data", [4], channels=3, resolution=R)
    run_dir = tmp_path / "run"
    run([PYTHON, TRAIN, "--config", str(REPO / "configs" / f"{name}.yaml"), "train.steps=2", "train.batch_size=2",
         "train.log_every=1", "train.sample_every=1000", "eval.enabled=false", "data.num_workers=1",
         "data.shuffle_buffer=4", "run.threads=2", f"data.urls={urls[0]}", f"run.dir={run_dir}"],
        cwd=tmp_path, timeout=1400)
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["status"] == "finished" and info["steps"] == 2 and info["model"] == "stylegan2"
    assert info["params"] == expected_counts(R, 3, 512, 512, 8, base, 512)
    assert [(p["name"], p["every"]) for p in info["phases"]] == [("Dmain", 1), ("Dreg", 16), ("Gmain", 1), ("Greg", 4)]
    state = torch.load(run_dir / "generator.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
