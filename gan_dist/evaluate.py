"""Measure a trained generator: FD (digits FD or FID), KID and class coverage, as one JSON line.

    python -m gan_dist.evaluate --ckpt runs/20260101-120000
    python -m gan_dist.evaluate --ckpt runs/x/generator.pt --n 10000 eval.extractor=inception \\
        eval.inception_weights=/models/inception_v3_google-0cc3c7bd.pth
    torchrun --nproc_per_node 8 -m gan_dist.evaluate --ckpt RUN --n 50000

The reference is the run's own dataset (`data.urls` of its config.yaml; override it with
`data.urls=...`), whose statistics are cached next to the shards. Defaults come from the
run's `eval` section; `key=value` arguments override any config key. With several processes,
each rank generates and embeds its share of the N samples; the samples (and so the numbers)
do not depend on the number of processes, up to floating-point rounding.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional

import torch

from gan_dist.cli import add_weights_args, run_cli
from gan_dist.generate import load_generator


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gan_dist.evaluate", description="FD/KID of a trained gan_dist generator.")
    p.add_argument("--ckpt", required=True, help="run directory, generator .pt file or training checkpoint")
    p.add_argument("--n", type=int, default=None, help="generated images (default: the run's eval.num_samples)")
    p.add_argument("--seed", type=int, default=None,
                   help="latent seed (default: the one evaluations during training use)")
    add_weights_args(p)
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. eval.extractor=inception data.urls=...")
    args = p.parse_args(argv)
    if args.n is not None and args.n < 2:
        p.error("--n must be >= 2 (a covariance needs two samples)")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)

    def body(info: Any) -> None:
        from gan_dist.config import ConfigError
        from gan_dist.metrics.evaluation import EVAL_SEED, training_evaluator

        overrides = list(args.overrides) + ["eval.enabled=true"]
        if args.n is not None:
            overrides.append(f"eval.num_samples={args.n}")
        loaded = load_generator(args.ckpt, args.ema, info.device, overrides)
        cfg = loaded.cfg
        shards = _shards(cfg, info.is_main)
        evaluator = training_evaluator(cfg, shards, info.device, info.is_main)
        if evaluator is None:
            raise ConfigError("no extractor for this dataset: set eval.extractor=inception and "
                              "eval.inception_weights=/path/to/inception_v3_google-0cc3c7bd.pth")
        evaluator.seed = EVAL_SEED if args.seed is None else args.seed
        G = loaded.G

        @torch.no_grad()
        def generate(z: torch.Tensor) -> torch.Tensor:
            return G(z).float()

        result = evaluator.run(generate, info.device)
        if info.is_main:
            print(json.dumps({"ckpt": args.ckpt, "weights": loaded.source, "ema": loaded.ema, "step": loaded.step,
                              "world_size": info.world_size, **result}), flush=True)

    from gan_dist.data import DataError

    return run_cli("gan_dist.evaluate", body, usage_errors=(DataError,))


def _shards(cfg, is_main: bool):
    """The run's shard list, resolved on rank 0 and shared (the demo digits are written if needed)."""
    from gan_dist import distributed as gdist
    from gan_dist.data import shared_shards

    return shared_shards(cfg, is_main, gdist.broadcast_object)


if __name__ == "__main__":
    sys.exit(main())
