"""model.channels and model.resolution default to auto: the model takes the data's shape (from the
shards' manifest, else their first sample), and an explicit value that contradicts the data stops
the run before any work, naming both. Real tar shards, real training runs."""
from __future__ import annotations

import json

import pytest
import torch

from tests._mp import PYTHON, REPO, run
from tests.conftest import TINY
from tests.workers.data_shards import make_shards

TRAIN = str(REPO / "gan_dist" / "train.py")
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def rgb_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("rgb32")
    make_shards(root, [24, 24], channels=3, resolution=32)  # no manifest: the first sample tells
    return root


def test_rgb_shards_train_a_three_channel_model_with_the_default_config(tmp_path, rgb_shards):
    run_dir = tmp_path / "run"
    run([PYTHON, TRAIN, *TINY, "train.steps=2", f"data.urls={rgb_shards}", f"run.dir={run_dir}"],
        cwd=tmp_path, timeout=300)
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["data_shape"]["channels"] == 3 and info["data_shape"]["resolution"] == 32
    assert sorted(info["data_shape"]["auto"]) == ["channels", "resolution"]
    assert info["data_shape"]["source"] == "first sample"
    state = torch.load(run_dir / "generator.pt", weights_only=True)
    assert state["blocks.3.0.weight"].shape[1] == 3  # the last layer makes RGB images
    assert "channels: 3" in (run_dir / "config.yaml").read_text()  # resolved, for generate/evaluate


def test_an_explicit_value_that_contradicts_the_data_names_both(tmp_path, rgb_shards):
    r = run([PYTHON, TRAIN, *TINY, f"data.urls={rgb_shards}", "model.channels=1", f"run.dir={tmp_path / 'r'}"],
            cwd=tmp_path, timeout=300, check=False)
    assert r.returncode == 2, r.stderr
    assert "model.channels=1 but the data is RGB" in r.stderr and "model.channels=3" in r.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_a_data_resolution_the_family_cannot_build_names_the_key(tmp_path):
    root = tmp_path / "s16"
    make_shards(root, [16], channels=1, resolution=16)
    r = run([PYTHON, TRAIN, *TINY, f"data.urls={root}", f"run.dir={tmp_path / 'r'}"], cwd=tmp_path,
            timeout=300, check=False)
    assert r.returncode == 2, r.stderr
    assert "model.resolution=16" in r.stderr and "dcgan" in r.stderr
