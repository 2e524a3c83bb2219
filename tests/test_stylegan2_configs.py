"""The reference-settings StyleGAN2 configs (FFHQ 256 and 1024) start on a CPU at full widths.

256 px: real shards of that resolution, the real entry point, two iterations at batch 2 (the
first runs all four phases: Dmain, Dreg, Gmain, Greg), and run_info.json records the sizes.
1024 px: the trainer's two 64-image sample grids alone would cost ~19 TFLOP on a CPU, so the
config's networks, phases and optimizers are built through the same path (gan_dist.build) and
train one iteration of all four phases at batch 1."""
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
@pytest.mark.parametrize("name,R,base", [("stylegan2_256", 256, 16384)])
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


@pytest.mark.slow
def test_1024_config_trains_an_iteration_on_a_cpu():
    """The 1024 config's networks, phases and optimizers, built through the trainer's path, train
    one iteration at batch 1 with all four phases (Dmain, lazy R1, Gmain, lazy path length, whose
    double backwards keep full-resolution graphs: ~5 GiB). The trainer's own entry point is left
    to the 256 px test: its two 64-image sample grids alone would cost ~19 TFLOP here."""
    import math

    from gan_dist import distributed as gdist
    from gan_dist.build import setup_models, step_batches
    from gan_dist.config import load_config
    from gan_dist.loop import train_step
    from gan_dist.parallel import build_strategy

    cfg = load_config(REPO / "configs" / "stylegan2_1024.yaml",
                      ["parallel.strategy=none", "train.precision=fp32", "train.batch_size=1", "run.threads=2"])
    strategy = build_strategy(gdist.init_distributed(), cfg)
    recipe, spec, counts = setup_models(strategy, cfg)
    assert counts == expected_counts(1024, 3, 512, 512, 8, 32768, 512)
    assert [p.name for p in recipe.due(0)] == ["Dmain", "Dreg", "Gmain", "Greg"]
    for name, k in (("G", 4), ("D", 16)):  # lazy regularisation: lr * k/(k+1), betas ** (k/(k+1))
        group = strategy.optimizers[name].param_groups[0]
        assert group["lr"] == pytest.approx(0.002 * k / (k + 1))
        assert group["betas"] == pytest.approx((0.0, 0.99 ** (k / (k + 1))))
    before = {n: [p.detach().clone() for p in strategy.raw[n].parameters()] for n in ("G", "D")}
    real = torch.rand(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batches = step_batches(cfg, spec, 0, 0, 1, lambda: real, torch.device("cpu"))
    stats = train_step(strategy, recipe, batches, 0)
    assert all(math.isfinite(v.item()) for v in stats.values()), stats
    assert stats["loss/r1"] > 0 and stats["loss/pl"] > 0 and stats["pl/mean"] > 0, stats  # both penalties ran
    for n in ("G", "D"):
        moved = [not torch.equal(a, b) for a, b in zip(before[n], strategy.raw[n].parameters())]
        assert sum(moved) > 0.9 * len(moved), (n, sum(moved), len(moved))
    strategy.close()
