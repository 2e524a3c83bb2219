"""Training runs with FSDP and DeepSpeed through the real CLI (2 gloo processes); the generator
they export is a plain state_dict that one process loads and samples from."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from gan_dist.config import load_config
from gan_dist.models import build_generator, build_models
from tests._mp import PYTHON, base_env, free_port, run, run_ranks

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(600)]

TINY = ["model.resolution=32", "model.channels=1", "model.dcgan.ngf=8", "model.dcgan.ndf=8", "model.dcgan.nz=16", "train.batch_size=8", "data.num_workers=0",
        "run.threads=1", "eval.enabled=false", "train.log_every=1"]


def train(run_dir: Path, *overrides: str) -> dict:
    run_ranks(["-m", "gan_dist.train", *TINY, f"run.dir={run_dir}", *overrides], 2, timeout=400)
    return json.loads((run_dir / "run_info.json").read_text())


def sample_alone(run_dir: Path) -> torch.Tensor:
    """What a user does after training: rebuild G from config.yaml, load generator.pt, sample."""
    cfg = load_config(run_dir / "config.yaml")
    G = build_generator(cfg.model)
    state = torch.load(run_dir / "generator.pt", weights_only=True, map_location="cpu")
    G.load_state_dict(state)  # strict: the same keys as an unsharded model, full shapes
    initial, _ = build_models(cfg.model, cfg.run.seed)
    assert any(not torch.equal(v, initial.state_dict()[k]) for k, v in state.items()), "G was not trained"
    assert all(v.dtype in (torch.float32, torch.int64) for v in state.values())
    G.eval()
    with torch.no_grad():
        images = G(torch.randn(16, cfg.model.dcgan.nz, generator=torch.Generator().manual_seed(0)))
    assert images.shape == (16, cfg.model.channels, cfg.model.resolution, cfg.model.resolution)
    assert torch.isfinite(images).all() and images.abs().max() <= 1 and images.std() > 0
    return images


def test_fsdp_bf16_with_batchnorm_trains_resumes_and_exports(tmp_path):
    run_dir = tmp_path / "fsdp"
    info = train(run_dir, "parallel.strategy=fsdp", "train.precision=bf16", "model.dcgan.norm=batch",
                 "train.steps=4", "train.ckpt_every=2")
    assert (info["strategy"], info["world_size"], info["precision"], info["status"]) == ("fsdp", 2, "bf16", "finished")
    shards = sorted(p.name for p in (run_dir / "checkpoints" / "step000000004" / "fsdp").iterdir())
    assert "__0_0.distcp" in shards and "__1_0.distcp" in shards
    # a longer run in the same directory continues from the sharded checkpoint
    info = train(run_dir, "parallel.strategy=fsdp", "train.precision=bf16", "model.dcgan.norm=batch",
                 "train.steps=6", "train.ckpt_every=2")
    assert info["strategy"] == "fsdp" and info["steps"] == 6
    assert info["resumed_from"].endswith("step000000004")
    sample_alone(run_dir)


def test_deepspeed_zero3_bf16_trains_and_exports(tmp_path):
    run_dir = tmp_path / "ds"
    info = train(run_dir, "parallel.strategy=deepspeed", "parallel.deepspeed.zero_stage=3",
                 "train.precision=bf16", "train.steps=3", "train.ckpt_every=2")
    assert (info["strategy"], info["world_size"], info["status"]) == ("deepspeed", 2, "finished")
    saved = run_dir / "checkpoints" / "step000000002" / "deepspeed"
    assert (saved / "G" / "state").is_dir() and (saved / "D" / "state").is_dir()
    sample_alone(run_dir)


def test_accelerate_launch_use_fsdp_runs_fsdp_with_its_settings(tmp_path):
    """`accelerate launch --use_fsdp` must not quietly become DDP: run_info says what ran, and
    its FSDP settings (no resharding after forward, CPU offload) are the run's."""
    run_dir = tmp_path / "acc"
    env = base_env()
    run([PYTHON, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2",
         "--fsdp_reshard_after_forward", "false", "--fsdp_offload_params", "true",
         "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
         "gan_dist/train.py", *TINY, "train.precision=fp32", "train.steps=2", f"run.dir={run_dir}"],
        timeout=400, env=env, cwd=Path(__file__).resolve().parent.parent)
    info = json.loads((run_dir / "run_info.json").read_text())
    assert (info["strategy"], info["world_size"], info["launcher"]) == ("fsdp", 2, "accelerate")
    fsdp = yaml.safe_load((run_dir / "config.yaml").read_text())["parallel"]["fsdp"]
    assert fsdp["reshard_after_forward"] is False and fsdp["cpu_offload"] is True
    sample_alone(run_dir)
