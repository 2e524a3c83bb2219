"""One rank of a data-parallel exactness job, started by tests/test_ddp_exact.py.

Every rank draws the same global batches from one seed and trains on its own slice, so a
W-process run and a 1-process run with a W times larger batch see the same samples. The
optimizers are swapped for plain SGD: Adam is invariant to the scale of the gradients and
would hide a reduction that sums instead of averaging.

Writes {"G": state_dict, "D": state_dict, "bytes": {...}, "calls": {...}} to --out.
"""
from __future__ import annotations

import argparse
import contextlib

import torch

from gan_dist import distributed as gdist
from gan_dist.config import load_config
from gan_dist.loop import train_step
from gan_dist.build import setup_models
from gan_dist.parallel import build_strategy
from tests.workers.batches import rank_batches


def counting_hook(counter: dict, name: str):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(state, bucket):
        buf = bucket.buffer()
        counter["bytes"][name] += buf.numel() * buf.element_size()
        counter["calls"][name] += 1
        return allreduce_hook(None, bucket)
    return hook


def seed_loop_step(G, D, optG, optD, real, z):
    """The DCGAN example's step: separate real and fake backwards, G step through a live D."""
    optD.zero_grad()
    errD_real = torch.nn.functional.binary_cross_entropy_with_logits(D(real), torch.ones(len(real)))
    errD_real.backward()
    fake = G(z)
    errD_fake = torch.nn.functional.binary_cross_entropy_with_logits(D(fake.detach()), torch.zeros(len(real)))
    errD_fake.backward()
    optD.step()
    optG.zero_grad()
    errG = torch.nn.functional.binary_cross_entropy_with_logits(D(fake), torch.ones(len(real)))
    errG.backward()
    optG.step()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--mode", choices=["gan_dist", "seed"], default="gan_dist")
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--d-steps", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--norm", default="none")
    p.add_argument("--loss", default="nonsaturating")
    args = p.parse_args()

    info = gdist.init_distributed(timeout_s=120)
    W, r = info.world_size, info.rank
    cfg = load_config(None, ["train.precision=fp32", f"model.dcgan.norm={args.norm}", "model.resolution=32", "model.channels=1", "model.dcgan.ngf=8",
                             "model.dcgan.ndf=8", "model.dcgan.nz=16", f"train.grad_accum={args.accum}",
                             f"train.d_steps={args.d_steps}", f"train.loss={args.loss}"])
    strategy = build_strategy(info, cfg)
    recipe, _, _ = setup_models(strategy, cfg, seed=3,
                                make_optimizer=lambda name, params, **kw: torch.optim.SGD(params, lr=0.05))

    counter = {"bytes": {"G": 0, "D": 0}, "calls": {"G": 0, "D": 0}}
    if W > 1:
        for name in ("G", "D"):
            strategy.wrapped[name].register_comm_hook(None, counting_hook(counter, name))

    gen = torch.Generator().manual_seed(1234)
    d_grads_in_g_phase = []
    for _ in range(args.iters):
        batches = rank_batches(gen, args.global_batch, args.d_steps, args.accum, r, W, cfg.model.dcgan.nz)
        if args.mode == "seed":
            (b,) = batches[0]
            seed_loop_step(strategy.G, strategy.D, strategy.optimizers["G"], strategy.optimizers["D"], b.real, b.z)
        else:
            train_step(strategy, recipe, batches)
            d_grads_in_g_phase.append(any(p.grad is not None for p in strategy.raw["D"].parameters()))

    out = {"G": {k: v.clone() for k, v in strategy.raw["G"].state_dict().items()},
           "D": {k: v.clone() for k, v in strategy.raw["D"].state_dict().items()},
           "bytes": counter["bytes"], "calls": counter["calls"],
           "numel": {n: sum(p.numel() for p in strategy.raw[n].parameters()) for n in ("G", "D")},
           "d_grads_in_g_phase": d_grads_in_g_phase, "strategy": strategy.name, "world_size": W}
    torch.save(out, args.out)
    strategy.close()
    del strategy
    gdist.teardown()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
