"""The CUDA paths: device placement, bf16, fp16 with one GradScaler per model, cuDNN settings,
pinned-memory transfers, torch.compile, and (with 2 or more GPUs) NCCL with every strategy.

Every test skips without CUDA; benchmarks/gpu_check.sh runs this file on a GPU machine.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests._ckpt import BIN, TRAIN, latest, train, train_cmd
from tests._mp import REPO, base_env, free_port, run

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.timeout(600)]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 or more CUDA GPUs")


def run_info(run_dir: Path) -> dict:
    return json.loads((run_dir / "run_info.json").read_text())


def finite_state(state: dict) -> bool:
    return all(torch.isfinite(v.float()).all() for v in state.values() if v.is_floating_point())


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_training_runs_on_the_gpu_in_every_precision(tmp_path, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    run_dir = tmp_path / "run"
    train(run_dir, "train.steps=6", "train.ckpt_every=3", f"train.precision={precision}")
    info = run_info(run_dir)
    assert info["device"].startswith("cuda") and info["device_name"] == torch.cuda.get_device_name(0)
    assert info["precision"] == precision and info["status"] == "finished"
    g = torch.load(run_dir / "generator.pt", weights_only=True)
    assert finite_state(g)
    ckpt = latest(run_dir)
    rank = torch.load(ckpt / "rank00000.pt", weights_only=True)
    assert "cuda" in rank["rng"]  # the GPU's RNG state is part of the checkpoint
    scalers = torch.load(ckpt / "models.pt", weights_only=True)["scalers"]
    if precision == "fp16":  # one scaler per model, each with its own scale
        assert set(scalers) >= {"G", "D"} and all(scalers[n].get("scale") for n in ("G", "D")), scalers
    # the run resumes on the GPU
    r = train(run_dir, "train.steps=8", "train.ckpt_every=3", f"train.precision={precision}")
    assert "at step 6" in r.stderr


def test_models_and_batches_live_on_the_gpu_with_cudnn_autotuning():
    from gan_dist.config import load_config
    from gan_dist.distributed import DistInfo
    from gan_dist.parallel import build_strategy

    cfg = load_config(None, ["train.precision=bf16"])
    device = torch.device("cuda", 0)
    strategy = build_strategy(DistInfo(0, 1, 0, 1, 0, device, None, "python"), cfg)
    torch.backends.cudnn.benchmark = False
    module = strategy.prepare_module(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()), "G")
    assert torch.backends.cudnn.benchmark  # fixed shapes: cuDNN picks its kernels once
    assert all(p.is_cuda for p in module.parameters())
    with strategy.autocast():
        y = module(torch.randn(2, 3, 16, 16, device=device))
    assert y.is_cuda and y.dtype == torch.bfloat16


def test_the_loader_pins_host_memory_and_copies_to_the_gpu():
    """pin_memory: the batches come out of the loader workers in page-locked memory, so that the
    copy to the GPU (non_blocking) overlaps the step."""
    from gan_dist.config import load_config
    from gan_dist.data import make_loader, shared_shards

    cfg = load_config(None, ["train.batch_size=8", "data.num_workers=1"])
    loader = make_loader(cfg, shared_shards(cfg, True, lambda x: x), 0, 1, torch.device("cuda", 0))
    try:
        images = next(loader)
        assert loader._loader.pin_memory
        raw = next(loader._it)  # what the worker hands over, before the copy
        assert raw["images"].is_pinned()
    finally:
        loader.close()
    assert images.is_cuda and images.shape[0] == 8


def test_compiled_training_runs_on_the_gpu(tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir, "train.steps=4", "train.compile=true", "train.precision=bf16", timeout=600)
    info = run_info(run_dir)
    assert info["device"].startswith("cuda") and info["status"] == "finished"
    assert finite_state(torch.load(run_dir / "generator.pt", weights_only=True))


@two_gpus
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed"])
def test_two_gpus_train_with_nccl(tmp_path, strategy):
    run_dir = tmp_path / "run"
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{free_port()}", *TRAIN,
           *train_cmd(run_dir, "train.steps=6", "train.ckpt_every=3", "train.precision=bf16",
                      f"parallel.strategy={strategy}")[3:]]
    r = run(cmd, timeout=600, check=False, env=base_env(), cwd=REPO)
    assert r.returncode == 0, r.stderr[-4000:]
    info = run_info(run_dir)
    assert info["backend"] == "nccl" and info["world_size"] == 2 and info["strategy"] == strategy
    assert finite_state(torch.load(run_dir / "generator.pt", weights_only=True))
