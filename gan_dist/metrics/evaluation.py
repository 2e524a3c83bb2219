"""Distributed FID/KID of a generator against a dataset's cached reference statistics.

Every rank generates and embeds its share of the N samples (`shares.share`), the features
are gathered on rank 0, which computes the distances and broadcasts the numbers. All ranks
call the generator the same number of times with batches of the same size, so a sharded
generator (FSDP), whose forward is collective, works as well as a replicated one.

Reference statistics of a dataset (mean and covariance of its features, plus up to
`KID_REFERENCE_MAX` features for KID) are computed once, by all ranks over disjoint shards,
and cached in a file next to the shards (or in the gan_dist cache directory when that is
not writable); the file name carries a hash of the extractor's weights and of the shards'
names, sizes and modification times.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from gan_dist.metrics.extractors import Extractor
from gan_dist.metrics.frechet import feature_stats, frechet_distance, kernel_inception_distance
from gan_dist.metrics.shares import all_counts, gather_rows, latents, share, share_counts

KID_REFERENCE_MAX = 10_000  # reference features kept for KID (a seeded random subset)
CACHE_VERSION = 1
EVAL_SEED = 20_240_601  # latents of the evaluation samples: the same at every evaluation


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)


def _broadcast(obj: Any) -> Any:
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@dataclass
class Reference:
    """What FD and KID compare against: a dataset's feature statistics."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray  # float32, at most KID_REFERENCE_MAX rows
    n: int  # images the statistics were computed from
    path: Optional[Path] = None

    @classmethod
    def from_features(cls, features: np.ndarray, seed: int = 0) -> "Reference":
        feats = np.asarray(features)
        mu, sigma = feature_stats(feats)
        if len(feats) > KID_REFERENCE_MAX:
            keep = np.sort(np.random.default_rng(seed).choice(len(feats), KID_REFERENCE_MAX, replace=False))
            feats = feats[keep]
        return cls(mu, sigma, feats.astype(np.float32), int(len(features)))

    def save(self, path: Path, meta: dict) -> None:
        """Atomically: a reader never sees half a file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, mu=self.mu, sigma=self.sigma, features=self.features, n=np.int64(self.n),
                     meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
        os.replace(tmp, path)
        self.path = path

    @classmethod
    def load(cls, path: Path) -> "Reference":
        with np.load(path, allow_pickle=False) as z:
            return cls(z["mu"], z["sigma"], z["features"], int(z["n"]), Path(path))


# ---- the dataset side ---------------------------------------------------------------------------
def _shard_signature(url: str) -> list:
    from gan_dist.data.tario import is_remote, local_path

    if is_remote(url):
        return [url]
    st = os.stat(local_path(url))
    return [os.path.abspath(local_path(url)), st.st_size, int(st.st_mtime)]


def reference_cache_paths(urls: Sequence[str], identity: str, channels: int, resolution: int,
                          max_images: int) -> list[Path]:
    """Where the reference statistics of these shards may be cached: next to the shards
    (when they are local files in one writable directory), then the gan_dist cache."""
    from gan_dist.data.demo import cache_dir
    from gan_dist.data.tario import is_remote, local_path

    key = json.dumps({"v": CACHE_VERSION, "extractor": identity, "channels": channels, "resolution": resolution,
                      "max_images": max_images, "shards": [_shard_signature(u) for u in urls]})
    name = f".gan_dist-refstats-{identity.split('-')[0]}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz"
    paths = []
    if not any(is_remote(u) for u in urls):
        parents = {Path(local_path(u)).resolve().parent for u in urls}
        if len(parents) == 1:
            parent = parents.pop()
            if os.access(parent, os.W_OK):
                paths.append(parent / name)
    paths.append(cache_dir() / "refstats" / name.lstrip("."))
    return paths


def iter_shard_images(urls: Sequence[str], channels: int, resolution: int) -> Any:
    """Every decodable image of the shards, in order, as float (C, R, R) in [-1, 1]."""
    from gan_dist.data.decode import BadSample, decode_sample
    from gan_dist.data.tario import iter_samples, open_shard, shard_size

    for url in urls:
        with open_shard(url) as stream:
            for _, _, members in iter_samples(stream, size=shard_size(url, stream)):
                try:
                    img = decode_sample(members, channels, resolution)
                except BadSample:
                    continue
                yield torch.from_numpy(np.array(img, dtype=np.uint8)).float().div_(127.5).sub_(1.0)


def _embed_batches(images: Any, extractor: Extractor, batch_size: int, limit: int) -> torch.Tensor:
    feats, batch = [], []
    taken = 0
    for img in images:
        if taken >= limit:
            break
        batch.append(img)
        taken += 1
        if len(batch) == batch_size:
            feats.append(extractor(torch.stack(batch))[0].cpu())
            batch = []
    if batch:
        feats.append(extractor(torch.stack(batch))[0].cpu())
    return torch.cat(feats) if feats else torch.empty(0, extractor.feature_dim)


def dataset_reference(urls: Sequence[str], extractor: Extractor, channels: int, resolution: int,
                      batch_size: int = 256, max_images: int = 0, log: Callable[[str], None] = print,
                      ) -> Optional[Reference]:
    """The dataset's reference statistics on rank 0 (None elsewhere), from the cache when
    present. Collective: on a cache miss every rank embeds the shards r, r + W, ... ."""
    rank, world = _rank_world()
    paths = reference_cache_paths(urls, extractor.identity, channels, resolution, max_images)
    found = None
    if rank == 0:
        found = next((str(p) for p in paths if p.is_file()), None)
    found = _broadcast(found)
    if found is not None:
        return Reference.load(Path(found)) if rank == 0 else None

    started = time.time()
    limit = math.ceil(max_images / world) if max_images > 0 else sys.maxsize
    mine = _embed_batches(iter_shard_images(list(urls)[rank::world], channels, resolution),
                          extractor, batch_size, limit)
    counts = all_counts(len(mine))
    feats = gather_rows(mine, counts)
    if rank != 0:
        return None
    if feats is None or len(feats) < 2:
        raise ValueError(f"the dataset ({len(urls)} shard(s), first {urls[0]!r}) gave {0 if feats is None else len(feats)} "
                         f"decodable {channels} x {resolution} x {resolution} image(s): too few for reference statistics")
    ref = Reference.from_features(feats.numpy())
    meta = {"extractor": extractor.identity, "images": ref.n, "shards": len(urls), "first_shard": urls[0],
            "seconds": round(time.time() - started, 2)}
    for path in paths:
        try:
            ref.save(path, meta)
            break
        except OSError:
            continue
    log(f"eval: reference statistics of {ref.n} images ({extractor.name}) computed in "
        f"{time.time() - started:.1f} s" + (f", cached in {ref.path}" if ref.path else ""))
    return ref


# ---- the generator side -------------------------------------------------------------------------
def generated_features(generate: Callable[[torch.Tensor], torch.Tensor], extractor: Extractor, n: int, nz: int,
                       batch_size: int, seed: int = EVAL_SEED, device: Optional[torch.device] = None,
                       ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Features (and class probabilities) of samples 0..n-1, on rank 0 in index order. Collective.

    Every rank runs ceil(ceil(n / W) / batch_size) batches of the same sizes; rows beyond its
    share (at most one per rank) are dropped before gathering.
    """
    rank, world = _rank_world()
    start, end = share(n, rank, world)
    per_rank = math.ceil(n / world)
    z_all = latents(start, start + per_rank, nz, seed)
    feats, probs = [], []
    for i in range(0, per_rank, batch_size):
        z = z_all[i:i + batch_size]
        images = generate(z.to(device) if device is not None else z)
        f, p = extractor(images)
        feats.append(f.cpu())
        if p is not None:
            probs.append(p.cpu())
    mine = end - start
    counts = share_counts(n, world)
    all_feats = gather_rows(torch.cat(feats)[:mine], counts)
    all_probs = gather_rows(torch.cat(probs)[:mine], counts) if probs else None
    return all_feats, all_probs


def distances(feats: torch.Tensor, probs: Optional[torch.Tensor], reference: Reference, extractor: Extractor,
              kid_subsets: int = 100, kid_subset_size: int = 1000, coverage_threshold: float = 0.9,
              ) -> dict[str, float]:
    """FD, KID (and class coverage for a digits classifier) of gathered features."""
    from gan_dist.metrics.digits import coverage_from_probs

    out: dict[str, float] = {}
    x = feats.double().numpy()
    if not np.isfinite(x).all():  # a diverged generator: NaN images, NaN features
        out[extractor.fd_key] = out["kid"] = out["kid_std"] = float("nan")
    else:
        mu, sigma = feature_stats(x)
        out[extractor.fd_key] = frechet_distance(mu, sigma, reference.mu, reference.sigma)
        kid, kid_std = kernel_inception_distance(x, reference.features, kid_subsets, kid_subset_size)
        out["kid"], out["kid_std"] = kid, kid_std
    if probs is not None:
        cov = coverage_from_probs(probs, coverage_threshold)
        out["class_coverage"] = cov.covered
        out["confident_fraction"] = cov.confident_fraction
    return out


class Evaluator:
    """FD/KID of a generator against a dataset, computed with all ranks. Collective methods."""

    def __init__(self, extractor: Extractor, reference: Optional[Reference], num_samples: int, nz: int,
                 batch_size: int = 250, kid_subsets: int = 100, kid_subset_size: int = 1000,
                 seed: int = EVAL_SEED) -> None:
        self.extractor = extractor
        self.reference = reference  # rank 0 only
        self.num_samples = num_samples
        self.nz = nz
        self.batch_size = batch_size
        self.kid_subsets = kid_subsets
        self.kid_subset_size = kid_subset_size
        self.seed = seed

    @property
    def fd_key(self) -> str:
        return self.extractor.fd_key

    def run(self, generate: Callable[[torch.Tensor], torch.Tensor], device: Optional[torch.device] = None,
            ) -> dict[str, Any]:
        """Metrics of `generate` (latents -> images in [-1, 1]) on every rank."""
        started = time.time()
        feats, probs = generated_features(generate, self.extractor, self.num_samples, self.nz,
                                          self.batch_size, self.seed, device)
        result = None
        if feats is not None and self.reference is not None:
            result = {"extractor": self.extractor.name, "num_samples": int(len(feats)),
                      **distances(feats, probs, self.reference, self.extractor, self.kid_subsets,
                                  self.kid_subset_size),
                      "reference_images": self.reference.n}
            result["seconds"] = round(time.time() - started, 3)
        return _broadcast(result)


def build_evaluator(eval_cfg: Any, extractor: Extractor, urls: Sequence[str], channels: int, resolution: int,
                    nz: int, log: Callable[[str], None] = print) -> Evaluator:
    """Reference statistics (cached) and the evaluator the `eval` config section describes. Collective."""
    extractor.check_images(channels, resolution)
    reference = dataset_reference(urls, extractor, channels, resolution, eval_cfg.batch_size,
                                  eval_cfg.reference_images, log)
    return Evaluator(extractor, reference, eval_cfg.num_samples, nz, eval_cfg.batch_size,
                     eval_cfg.kid_subsets, eval_cfg.kid_subset_size)


def training_evaluator(cfg: Any, shards: Any, device: torch.device, is_main: bool) -> Optional[Evaluator]:
    """The evaluator a training run uses, or None (eval.enabled=false, or eval.extractor=auto
    without an extractor for this data). Collective. Raises ConfigError for an extractor that
    cannot run here (missing Inception weights, digits metrics on other images)."""
    from gan_dist.metrics.extractors import build_extractor, resolve_extractor_name

    if not cfg.eval.enabled:
        return None
    demo = cfg.data.urls in (None, "", [])
    name = resolve_extractor_name(cfg.eval, demo)
    if name is None:
        if is_main:
            print("gan_dist: note: no evaluation: eval.extractor=auto found no InceptionV3 weights for this "
                  "dataset (set eval.inception_weights or GAN_DIST_INCEPTION_WEIGHTS to measure FID/KID)",
                  file=sys.stderr, flush=True)
        return None
    extractor = build_extractor(name, device, cfg.eval)
    urls = list(getattr(shards, "urls", shards))
    log = (lambda m: print(f"gan_dist: {m}", file=sys.stderr, flush=True)) if is_main else (lambda m: None)
    return build_evaluator(cfg.eval, extractor, urls, cfg.model.channels, cfg.model.resolution, cfg.model.nz, log)
