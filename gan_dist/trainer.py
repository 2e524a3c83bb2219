"""A training run: build everything from the config, run the loop, write the outputs.

Rank 0 alone writes into run.dir. Everything that may involve a collective (sampling with a
sharded G, gathering a full state_dict) is called on every rank.
"""
from __future__ import annotations

import json
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from gan_dist import distributed as gdist
from gan_dist.config import Config, to_yaml
from gan_dist.data import real_batches, resolve_urls
from gan_dist.distributed import DistInfo
from gan_dist.logging import RunLogger, Throughput, save_grid
from gan_dist.loop import train_step
from gan_dist.models import build_models
from gan_dist.parallel import build_strategy

NUM_SAMPLES = 64  # images in a sample grid


def seed_everything(seed: int, rank: int) -> None:
    """Per-rank host RNGs; model initialisation uses its own seed, identical on all ranks."""
    random.seed(seed * 1000 + rank)
    np.random.seed((seed * 1000 + rank) % 2**32)
    torch.manual_seed(seed * 1000 + rank)


def package_versions() -> dict[str, Optional[str]]:
    from importlib import metadata

    out: dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "accelerate", "webdataset", "deepspeed", "gan_dist"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def default_run_dir() -> str:
    """runs/<timestamp>, chosen by rank 0 so that all ranks agree."""
    return gdist.broadcast_object(time.strftime("runs/%Y%m%d-%H%M%S"))


class Trainer:
    def __init__(self, cfg: Config, info: DistInfo) -> None:
        self.cfg, self.info = cfg, info
        self.device = info.device
        if cfg.run.dir is None:
            cfg.run.dir = default_run_dir()
        self.run_dir = Path(cfg.run.dir)
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        seed_everything(cfg.run.seed, info.rank)

        self.strategy = build_strategy(info, cfg)
        G, D = build_models(cfg.model, cfg.run.seed)
        self.strategy.setup(G, D)

        urls = resolve_urls(cfg.data) if info.is_main else None
        self.urls = gdist.broadcast_object(urls)
        self.data = real_batches(cfg, self.urls, info.rank, info.world_size, self.device)
        self.noise = torch.Generator(device=self.device).manual_seed(cfg.run.seed * 1000 + info.rank + 1)
        self.fixed_noise = torch.randn(NUM_SAMPLES, cfg.model.nz,
                                       generator=torch.Generator().manual_seed(cfg.run.seed)).to(self.device)
        self.step = 0
        self.images_seen = 0
        t = cfg.train
        self.images_per_step = t.batch_size * t.grad_accum * t.d_steps * info.world_size
        self.started = time.time()
        self.logger = RunLogger(self.run_dir, info.is_main, t.steps, self.step)
        self.write_run_info("running")

    # ---- the loop -------------------------------------------------------------------------
    def next_batches(self) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        t = self.cfg.train
        return [[(next(self.data), torch.randn(t.batch_size, self.cfg.model.nz, device=self.device,
                                               generator=self.noise))
                 for _ in range(t.grad_accum)] for _ in range(t.d_steps)]

    def fit(self) -> None:
        t = self.cfg.train
        meter = Throughput()
        meter.tick(self.images_seen)
        while self.step < t.steps:
            stats = train_step(self.strategy, self.next_batches(), t.loss)
            self.step += 1
            self.images_seen += self.images_per_step
            last = self.step == t.steps
            if self.step % t.log_every == 0 or last or self.step == 1:
                self.log(stats, meter.tick(self.images_seen))
            if self.step % t.sample_every == 0 or last:
                self.sample_grid(self.run_dir / "samples" / f"step{self.step:07d}.png")
            self.logger.advance()
        self.finish()

    def log(self, stats: dict[str, torch.Tensor], img_per_sec: float) -> None:
        keys = sorted(stats)
        values = gdist.all_reduce_mean(torch.stack([stats[k].float() for k in keys])).tolist()
        v = dict(zip(keys, values))
        self.logger.scalars(self.step, {
            "loss/D": v["loss_D"], "loss/G": v["loss_G"], "D/real": v["D_x"],
            "D/fake_before_D_update": v["D_G_z1"], "D/fake_after_D_update": v["D_G_z2"],
            "perf/img_per_sec": img_per_sec,
            "perf/img_per_sec_per_process": img_per_sec / self.info.world_size,
            "progress/kimg": self.images_seen / 1000.0,
        })

    @torch.no_grad()
    def samples(self, z: torch.Tensor) -> torch.Tensor:
        """G(z) in eval mode. Called on every rank: a sharded G needs all of them."""
        G = self.strategy.sample_module("G")
        was_training = G.training
        G.eval()
        try:
            with self.strategy.autocast():
                return G(z).float()
        finally:
            G.train(was_training)

    def sample_grid(self, path: Path) -> None:
        images = self.samples(self.fixed_noise)
        self.logger.images(self.step, "samples", images, path)

    # ---- outputs --------------------------------------------------------------------------
    def finish(self) -> None:
        self.strategy.sync_buffers()
        state = self.strategy.full_state_dict("G")
        if self.info.is_main:
            tmp = self.run_dir / "generator.pt.tmp"
            torch.save(state, tmp)
            tmp.replace(self.run_dir / "generator.pt")
        final = self.samples(self.fixed_noise)
        if self.info.is_main:
            save_grid(final, self.run_dir / "samples.png")
        self.write_run_info("finished")
        self.logger.close()

    def write_run_info(self, status: str) -> None:
        if not self.info.is_main:
            return
        elapsed = time.time() - self.started
        info = {
            "status": status,
            "world_size": self.info.world_size,
            "strategy": self.strategy.name,
            "requested_strategy": self.cfg.parallel.strategy,
            "precision": self.strategy.precision.name,
            "device": str(self.device),
            "device_name": (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                            else platform.processor() or platform.machine()),
            "backend": self.info.backend,
            "launcher": self.info.launcher,
            "num_nodes": max(1, self.info.world_size // max(1, self.info.local_world_size)),
            "threads_per_process": torch.get_num_threads(),
            "steps": self.step,
            "images_seen": self.images_seen,
            "elapsed_s": round(elapsed, 3),
            "img_per_sec": round(self.images_seen / elapsed, 3) if elapsed > 0 else None,
            "seed": self.cfg.run.seed,
            "argv": sys.argv,
            "versions": package_versions(),
        }
        path = self.run_dir / "run_info.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(info, indent=1))
        tmp.replace(path)

    def close(self) -> None:
        self.strategy.close()
        self.data = None
