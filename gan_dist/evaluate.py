"""Measure generated images: FID, KID, IS, precision/recall (or the digits metrics), as one JSON
line on stdout and a table on stderr.

    python -m gan_dist.evaluate --ckpt runs/20260101-120000                  # the run's own data and metrics
    python -m gan_dist.evaluate --real /data/ffhq --fake runs/x --metrics fid,kid,is,pr --n 50000
    python -m gan_dist.evaluate --real /data/shards --fake samples/ --metrics fid --n all
    torchrun --nproc_per_node 8 -m gan_dist.evaluate --real /data/ffhq --fake runs/x --n 50000

`--ckpt` evaluates a run (run directory, generator .pt or training checkpoint) against its own
dataset (`data.urls` of its config.yaml, override with `data.urls=...`) with its `eval` section.
`--real` is a folder of images or WebDataset shards; `--fake` is a folder, shards, or a run /
checkpoint whose generator makes the `--n` images. `--n all` takes every image of a fake set;
the real set is used whole unless `--n-real` says otherwise. Weights of the standard networks
are never downloaded: `eval.inception_weights=...`, `eval.vgg16_weights=...` (docs/evaluation.md).
With several processes each rank embeds its share of the images, exactly N in total; reference
statistics are cached per (data set, network, number of images).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from gan_dist.cli import UsageError, add_weights_args, run_cli
from gan_dist.generate import load_generator


def _count(value: str) -> Optional[int]:
    if value.lower() == "all":
        return None
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a number of images nor 'all'") from None
    if n < 2:
        raise argparse.ArgumentTypeError("at least 2 images (a covariance needs two samples)")
    return n


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gan_dist.evaluate", description="FID, KID, IS, precision/recall of generated images.")
    p.add_argument("--ckpt", help="a run (directory, generator .pt or checkpoint), measured against its own dataset")
    p.add_argument("--real", help="the real images: a folder of images or WebDataset shards")
    p.add_argument("--fake", help="the generated images: a folder, shards, or a run / checkpoint to sample --n images from")
    p.add_argument("--metrics", default=None,
                   help="comma-separated: fid, kid, is, pr, digits_fd (default: eval.metrics of the run with --ckpt, "
                        "else fid,kid)")
    p.add_argument("--n", type=_count, default=None,
                   help="generated images, or the first N of a fake set ('all': every image); default with --ckpt: "
                        "the run's eval.num_samples")
    p.add_argument("--n-real", type=_count, default=None, help="the first N real images (default: all)")
    p.add_argument("--batch-size", type=int, default=None, help="images per rank and batch (default: eval.batch_size)")
    p.add_argument("--seed", type=int, default=None,
                   help="latent seed (default: the one evaluations during training use)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_weights_args(p)
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. eval.inception_weights=/models/x.pth")
    args = p.parse_args(argv)
    if args.ckpt and (args.real or args.fake):
        p.error("--ckpt measures a run against its own data; use either --ckpt or --real with --fake")
    if not args.ckpt and not (args.real and args.fake):
        p.error("give --ckpt RUN, or both --real and --fake")
    if args.batch_size is not None and args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    return args


def _is_run(path: Path) -> bool:
    """A generator to sample from (a run directory, a .pt file, a checkpoint), not an image set."""
    if path.is_file():
        return path.suffix == ".pt"
    return path.is_dir() and any((path / name).exists() for name in
                                 ("config.yaml", "generator.pt", "generator_ema.pt", "trainer.pt", "checkpoints"))


def print_table(result: dict[str, Any]) -> None:
    rows = [(k, result[k]) for k in ("fid", "digits_fd", "kid", "kid_std", "is", "is_std", "precision", "recall",
                                     "class_coverage") if k in result]
    lines = [f"{'metric':<16}{'value':>14}"] + [f"{k:<16}{v:>14.6g}" for k, v in rows]
    for key in ("num_fake", "num_real", "num_samples", "reference_images", "world_size", "seconds"):
        if key in result:
            lines.append(f"{key:<16}{result[key]:>14}")
    for name, ident in (result.get("networks") or {}).items():
        lines.append(f"network         {ident}")
    for note in result.get("notes") or []:
        lines.append(f"note: {note}")
    print("\n".join(lines), file=sys.stderr, flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)

    def body(info: Any) -> None:
        result = run_ckpt(args, info) if args.ckpt else run_sets(args, info)
        if info.is_main:
            print(json.dumps(result), flush=True)
            print_table(result)

    from gan_dist.data import DataError
    from gan_dist.metrics.sources import SourceError

    return run_cli("gan_dist.evaluate", body, usage_errors=(DataError, SourceError))


def run_ckpt(args: argparse.Namespace, info: Any) -> dict[str, Any]:
    from gan_dist.metrics.evaluation import EVAL_SEED, training_evaluator

    overrides = list(args.overrides) + ["eval.enabled=true"]
    if args.n is not None:
        overrides.append(f"eval.num_samples={args.n}")
    if args.metrics:
        overrides.append(f"eval.metrics={args.metrics}")
    if args.batch_size:
        overrides.append(f"eval.batch_size={args.batch_size}")
    loaded = load_generator(args.ckpt, args.ema, info.device, overrides)
    evaluator = training_evaluator(loaded.cfg, _shards(loaded.cfg, info.is_main), info.device, info.is_main)
    if evaluator is None:
        raise UsageError("nothing to measure for this dataset: give --metrics fid,kid and the Inception weights "
                         "(eval.inception_weights=/path/to/weights-inception-2015-12-05-6726825d.pth)")
    evaluator.seed = EVAL_SEED if args.seed is None else args.seed
    evaluator.progress = not args.no_progress
    G = loaded.G

    @torch.no_grad()
    def generate(z: torch.Tensor) -> torch.Tensor:
        return G(z).float()

    result = evaluator.run(generate, info.device)
    return {"ckpt": args.ckpt, "weights": loaded.source, "ema": loaded.ema, "step": loaded.step,
            "world_size": info.world_size, **result}


def run_sets(args: argparse.Namespace, info: Any) -> dict[str, Any]:
    from gan_dist.config import load_config
    from gan_dist.metrics.evaluation import (EVAL_SEED, build_extractors, evaluate_images, parse_metrics,
                                             plan_metrics)
    from gan_dist.metrics.sources import open_source

    cfg = load_config(None, list(args.overrides))
    metrics = parse_metrics(args.metrics or "fid,kid", key="--metrics")
    plan = plan_metrics(metrics, cfg.eval.extractor, key="--metrics")
    extractors = build_extractors(plan, info.device, cfg.eval)
    real = open_source(args.real)
    fake_path = Path(args.fake)
    extra: dict[str, Any] = {}
    if _is_run(fake_path):
        if args.n is None:
            raise UsageError("--fake is a run: give --n, the number of images to generate (50000 for the published "
                             "FID protocol)")
        loaded = load_generator(args.fake, args.ema, info.device)
        G = loaded.G

        @torch.no_grad()
        def fake(z: torch.Tensor) -> torch.Tensor:
            return G(z).float()

        channels, _, nz = _shape(loaded)
        extra = {"weights": loaded.source, "ema": loaded.ema, "step": loaded.step}
    else:
        fake, channels, nz = open_source(args.fake), 3, 0
    log = (lambda m: print(f"gan_dist: {m}", file=sys.stderr, flush=True)) if info.is_main else (lambda m: None)
    result = evaluate_images(real, fake, plan, extractors, args.n, args.n_real,
                             args.batch_size or min(cfg.eval.batch_size, 64), cfg.eval.kid_subsets,
                             cfg.eval.kid_subset_size, nz=nz, fake_channels=channels,
                             seed=EVAL_SEED if args.seed is None else args.seed, device=info.device,
                             progress=not args.no_progress, log=log)
    return {"real": args.real, "fake": args.fake, **extra, **result}


def _shape(loaded: Any) -> tuple[int, int, int]:
    from gan_dist.metrics.evaluation import model_shape

    return model_shape(loaded.cfg)


def _shards(cfg: Any, is_main: bool) -> Any:
    """The run's shard list, resolved on rank 0 and shared (the demo digits are written if needed)."""
    from gan_dist import distributed as gdist
    from gan_dist.data import shared_shards

    return shared_shards(cfg, is_main, gdist.broadcast_object)


if __name__ == "__main__":
    sys.exit(main())
