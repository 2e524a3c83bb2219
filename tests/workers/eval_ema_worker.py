"""One rank of an EMA job, started by tests/test_ema.py.

Trains a tiny DCGAN for a few steps with `parallel.strategy` (none, ddp, fsdp), updating the
EMA of G after every step, and records what the test compares: G's full weights after every
step (rank 0), this rank's EMA shadows, the EMA's full state_dict, the exported EMA generator,
and the full weights before, inside and after `ema.swapped()`.
"""
from __future__ import annotations

import argparse
import contextlib

import torch

from gan_dist import distributed as gdist
from gan_dist.config import load_config
from gan_dist.ema import EMA
from gan_dist.loop import Batch, train_step
from gan_dist.build import setup_models
from gan_dist.parallel import build_strategy


def sample(strategy, ema: EMA, nz: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of the EMA generator, made on every rank (a sharded forward is collective)."""
    z = torch.randn(4, nz, generator=torch.Generator().manual_seed(0))
    with ema.swapped():
        sampler = strategy.sample_module("G")
        sampler.eval()
        with torch.no_grad():
            images = sampler(z).float()
        sampler.train()
    return z, images


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--strategy", default="ddp")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=8, help="per rank")
    p.add_argument("--half-life-kimg", type=float, default=0.05)
    p.add_argument("--rampup", type=float, default=None)
    p.add_argument("--zero-stage", type=int, default=None, help="DeepSpeed ZeRO stage")
    p.add_argument("--swap-every-step", action="store_true",
                   help="sample from the EMA after every step (as evaluations during training do)")
    args = p.parse_args()

    info = gdist.init_distributed(timeout_s=120)
    cfg = load_config(None, ["train.precision=fp32", "model.dcgan.norm=batch", "model.resolution=32", "model.channels=1", "model.dcgan.ngf=8", "model.dcgan.ndf=8",
                             "model.dcgan.nz=16", f"parallel.strategy={args.strategy}"]
                      + ([f"parallel.deepspeed.zero_stage={args.zero_stage}"] if args.zero_stage is not None else []))
    strategy = build_strategy(info, cfg)
    recipe, _, _ = setup_models(strategy, cfg, seed=3)
    ema = EMA(strategy, args.half_life_kimg, args.rampup)

    gen = torch.Generator().manual_seed(100 + info.rank)  # each rank its own data
    global_batch = args.batch * info.world_size
    history, betas = [], []
    nimg = 0
    for _ in range(args.steps):
        real = torch.rand(args.batch, 1, 32, 32, generator=gen) * 2 - 1
        z = torch.randn(args.batch, cfg.model.dcgan.nz, generator=gen)
        train_step(strategy, recipe, [[Batch(real, z)]])
        if args.swap_every_step:
            sample(strategy, ema, cfg.model.dcgan.nz)
        betas.append(ema.update(nimg, global_batch))
        nimg += global_batch
        history.append(strategy.full_state_dict("G"))  # collective; None except on rank 0

    strategy.sync_buffers()
    before = strategy.full_state_dict("G")
    with ema.swapped():
        inside = strategy.full_state_dict("G")
    z, images = sample(strategy, ema, cfg.model.dcgan.nz)
    after = strategy.full_state_dict("G")
    out = {
        "rank": info.rank, "world_size": info.world_size, "strategy": strategy.name,
        "names": ema.names, "betas": betas, "global_batch": global_batch,
        "shadow": [s.clone() for s in ema.shadow], "sharded": ema.sharded,
        "state": ema.state_dict(), "exported": ema.full_state_dict(),
        "history": history, "before": before, "inside": inside, "after": after, "z": z, "images": images,
    }
    torch.save(out, args.out)
    strategy.close()
    del strategy, ema
    gdist.teardown()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
