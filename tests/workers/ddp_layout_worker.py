"""One rank of the DDP layout check started by tests/test_ddp_layout.py: a few steps of a small
DCGAN with NHWC activations, then what the raw weight gradients' layouts were and G's export.

Writes {"G": G's state_dict, "exported": full_state_dict("G") on rank 0, "mismatched": names
of parameters whose incoming gradient had other strides than the parameter} to --out.
"""
from __future__ import annotations

import argparse
import contextlib

import torch

from gan_dist import distributed as gdist
from gan_dist.build import setup_models
from gan_dist.config import load_config
from gan_dist.loop import Batch, train_step
from gan_dist.parallel import build_strategy


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--matmul-conv", default="auto")
    p.add_argument("--channels-last", default="true")
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=2)
    args = p.parse_args()

    info = gdist.init_distributed(timeout_s=120)
    W, r = info.world_size, info.rank
    res = 32
    # BatchNorm off: the statistics of a rank's half batch are not those of the whole batch
    cfg = load_config(None, [f"train.precision={args.precision}", "model.dcgan.ngf=8", "model.dcgan.ndf=8",
                             "model.dcgan.nz=16", "model.dcgan.norm=none", f"model.channels={args.channels}",
                             f"model.resolution={res}",
                             f"train.channels_last={args.channels_last}", f"train.matmul_conv={args.matmul_conv}",
                             f"parallel.strategy={'ddp' if W > 1 else 'none'}", "run.threads=1"])
    strategy = build_strategy(info, cfg)
    recipe, spec, _ = setup_models(strategy, cfg, seed=3,
                                   make_optimizer=lambda name, params, **kw: torch.optim.SGD(params, lr=0.05))
    mismatched: set[str] = set()
    for name in ("G", "D"):
        for n, param in strategy.raw[name].named_parameters():
            def seen(grad: torch.Tensor, key: str = f"{name}.{n}", param: torch.Tensor = param) -> None:
                if grad.stride() != param.stride():
                    mismatched.add(key)
            param.register_hook(seen)

    gen = torch.Generator().manual_seed(1234)
    b = args.global_batch // W
    for _ in range(args.iters):
        real = torch.rand(args.global_batch, args.channels, res, res, generator=gen) * 2 - 1
        z = torch.randn(args.global_batch, spec.z_dim, generator=gen)
        train_step(strategy, recipe, [[Batch(real[r * b:(r + 1) * b], z[r * b:(r + 1) * b])]])

    exported = strategy.full_state_dict("G")
    out = {"G": {k: v.detach().contiguous().clone() for k, v in strategy.raw["G"].state_dict().items()},
           "exported": exported, "mismatched": sorted(mismatched), "strategy": strategy.name}
    if r == 0:
        torch.save(out, args.out)
    strategy.close()
    del strategy
    gdist.teardown()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
