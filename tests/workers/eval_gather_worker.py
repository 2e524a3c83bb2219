"""One rank of a distributed-evaluation job, started by tests/test_eval_distributed.py.

--mode identity: the "generator" returns its latents as 1 x 4 x 4 images and the extractor
  flattens them, so the gathered features are exactly the latents of the samples: any sample
  missing, duplicated or out of order shows.
--mode digits: a tiny DCGAN and the digits classifier, features and class probabilities.
--mode reference: the demo dataset's reference statistics, every rank embedding its shards.

Rank 0 writes what it gathered to --out.
"""
from __future__ import annotations

import argparse
import contextlib

import torch
from torch import nn

from gan_dist import distributed as gdist
from gan_dist.metrics.evaluation import dataset_reference, generated_features
from gan_dist.metrics.extractors import DigitsExtractor, Extractor


class Flatten(Extractor):
    name = "flatten"
    feature_dim = 16
    outputs = {"features": 16}

    def __init__(self) -> None:
        super().__init__(nn.Identity(), torch.device("cpu"))

    def __call__(self, images):
        return {"features": images.flatten(1)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--mode", choices=["identity", "digits", "reference"], required=True)
    p.add_argument("--n", type=int, nargs="+", default=[37])
    p.add_argument("--batch", type=int, default=5)
    args = p.parse_args()
    info = gdist.init_distributed(timeout_s=120)
    torch.set_num_threads(1)
    out: dict = {"world_size": info.world_size}
    if args.mode == "identity":
        calls = []

        def generate(z: torch.Tensor) -> torch.Tensor:
            calls.append(len(z))
            return z.view(-1, 1, 4, 4)

        for n in args.n:
            calls.clear()
            outputs = generated_features(generate, Flatten(), n, nz=16, batch_size=args.batch, seed=7)
            out[n] = {"features": outputs["features"] if outputs else None, "calls": list(calls)}
    elif args.mode == "digits":
        from gan_dist.config import load_config
        from gan_dist.models import build_models

        cfg = load_config(None, ["model.resolution=32", "model.channels=1", "model.dcgan.ngf=8", "model.dcgan.ndf=8", "model.dcgan.nz=16"])
        G, _ = build_models(cfg.model, seed=3)
        G.eval()
        extractor = DigitsExtractor(torch.device("cpu"))
        for n in args.n:
            with torch.no_grad():
                outputs = generated_features(G, extractor, n, nz=16, batch_size=args.batch, seed=7)
            if outputs is not None:
                out[n] = {"features": outputs["features"], "probs": outputs["probs"]}
    else:
        from gan_dist.data.demo import ensure_demo_shards

        urls = gdist.broadcast_object(ensure_demo_shards() if info.is_main else None)
        ref = dataset_reference(urls, DigitsExtractor(torch.device("cpu")), 1, 32, batch_size=256)
        if ref is not None:
            out["reference"] = {"mu": torch.from_numpy(ref.mu), "sigma": torch.from_numpy(ref.sigma),
                                "n": ref.n, "path": str(ref.path)}
    if info.is_main:
        torch.save(out, args.out)
    gdist.teardown()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
