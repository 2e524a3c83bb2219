"""Distributed FID, KID, IS, precision/recall and digits metrics of a generator or an image set.

Every rank embeds its share of the N images (`shares.share`: a contiguous index range of the
generated samples, of a folder's sorted files or of the shards' samples), the outputs are
gathered on rank 0 in index order, which computes the numbers and broadcasts them. All ranks
call the generator the same number of times with batches of the same size, so a sharded
generator (FSDP), whose forward is collective, works as well as a replicated one.

Which networks run follows from the metrics (`plan_metrics`): FID, KID and IS on the
2015-12-05 Inception, precision/recall on VGG16, digits FD (and KID, class coverage) on the
bundled digits classifier. The reference side (the real images) is embedded once per
(data fingerprint, network identity, N) and cached as a .npz next to the shards (or in the
gan_dist cache directory): its features, mean and covariance.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from gan_dist import distributed as gdist
from gan_dist.config import ConfigError
from gan_dist.metrics.extractors import Extractor
from gan_dist.metrics.frechet import feature_stats, frechet_distance, kernel_inception_distance
from gan_dist.metrics.scores import SHUFFLE_SEED, inception_score, precision_recall
from gan_dist.metrics.shares import all_counts, gather_rows, latents, share, share_counts
from gan_dist.metrics.sources import ImageSource, ShardSource, SourceError

KID_REFERENCE_MAX = 10_000  # Reference.from_features' default subset for KID
CACHE_VERSION = 2
EVAL_SEED = 20_240_601  # latents of the evaluation samples: the same at every evaluation
KID_SEED = SHUFFLE_SEED  # torch-fidelity's: the same KID subsets on the same features
METRICS = ("fid", "kid", "is", "pr", "digits_fd")
Outputs = dict[str, torch.Tensor]


# ---- which metrics, which networks --------------------------------------------------------------
def parse_metrics(value: Union[str, Sequence[str]], key: str = "eval.metrics") -> list[str]:
    """'fid,kid' (or a list) -> ['fid', 'kid']; unknown names -> ConfigError naming `key`."""
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [str(v).strip().lower() for v in items if str(v).strip()]
    names = ["pr" if n in ("precision", "recall", "prc") else n for n in names]
    bad = [n for n in names if n not in METRICS]
    if bad or not names:
        raise ConfigError(f"{key}={value!r}: {'unknown metric ' + repr(bad[0]) if bad else 'no metric'}; "
                          f"choose from {', '.join(METRICS)} (comma-separated)")
    return list(dict.fromkeys(names))


@dataclass
class MetricPlan:
    metrics: list[str]
    main: Optional[str]  # network of FD / KID / IS: "digits" or "inception" (None: precision/recall only)
    pr: bool  # precision/recall on VGG16

    @property
    def extractor_names(self) -> dict[str, str]:
        roles = {"main": self.main} if self.main else {}
        if self.pr:
            roles["pr"] = "vgg16"
        return roles


def plan_metrics(metrics: Sequence[str], extractor: str = "auto", key: str = "eval.metrics") -> MetricPlan:
    """The networks the metrics need. `extractor` (eval.extractor) names the feature space of FD
    and KID: digits (digits_fd) or inception (fid); auto follows from the metrics."""
    m = list(metrics)
    inception = "fid" in m or "is" in m
    digits = "digits_fd" in m
    if inception and digits:
        raise ConfigError(f"{key}: digits_fd and fid/is are measured on different networks; evaluate them separately")
    if extractor == "digits" and inception:
        raise ConfigError(f"{key}: fid and is are measured on the Inception network, but eval.extractor=digits "
                          "(use digits_fd, or eval.extractor=inception)")
    if extractor == "inception" and digits:
        raise ConfigError(f"{key}: digits_fd is measured on the digits classifier, but eval.extractor=inception "
                          "(use fid, or eval.extractor=digits)")
    if inception or digits:
        main: Optional[str] = "inception" if inception else "digits"
    elif "kid" in m:
        main = "digits" if extractor == "digits" else "inception"
    else:
        main = None
    if main == "digits" and "kid" in m and "digits_fd" not in m:
        m.insert(0, "digits_fd")  # the digits classifier's evaluation always reports its FD
    return MetricPlan(m, main, "pr" in m)


def build_extractors(plan: MetricPlan, device: torch.device, eval_cfg: Any = None) -> dict[str, Extractor]:
    from gan_dist.metrics.extractors import build_extractor

    return {role: build_extractor(name, device, eval_cfg) for role, name in plan.extractor_names.items()}


# ---- reference statistics -----------------------------------------------------------------------
@dataclass
class Reference:
    """What the generated images are compared with: one network's features of the real images."""

    mu: Optional[np.ndarray]
    sigma: Optional[np.ndarray]
    features: np.ndarray  # float32
    n: int  # images the statistics were computed from
    path: Optional[Path] = None

    @classmethod
    def from_features(cls, features: np.ndarray, seed: int = 0, keep: Optional[int] = KID_REFERENCE_MAX,
                      stats: bool = True) -> "Reference":
        """Mean and covariance of all rows; at most `keep` rows kept (a seeded subset; None: all)."""
        feats = np.asarray(features)
        mu, sigma = feature_stats(feats) if stats else (None, None)
        if keep is not None and len(feats) > keep:
            rows = np.sort(np.random.default_rng(seed).choice(len(feats), keep, replace=False))
            feats = feats[rows]
        return cls(mu, sigma, feats.astype(np.float32), int(len(features)))

    def save(self, path: Path, meta: dict) -> None:
        """Atomically: a reader never sees half a file."""
        from gan_dist.atomic import atomic_write

        path.parent.mkdir(parents=True, exist_ok=True)
        empty = np.zeros(0)
        with atomic_write(path) as f:
            np.savez(f, mu=empty if self.mu is None else self.mu, sigma=empty if self.sigma is None else self.sigma,
                     features=self.features, n=np.int64(self.n),
                     meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
        self.path = path

    @classmethod
    def load(cls, path: Path) -> "Reference":
        with np.load(path, allow_pickle=False) as z:
            mu, sigma = z["mu"], z["sigma"]
            return cls(mu if mu.size else None, sigma if sigma.size else None, z["features"], int(z["n"]), Path(path))


def reference_cache_paths(source: ImageSource, identity: str, n: int) -> list[Path]:
    """Where the reference statistics of `n` images of `source` embedded by the network `identity`
    may be cached: next to the shards (local shards in one writable folder), then the gan_dist cache."""
    from gan_dist.data.demo import cache_dir
    from gan_dist.data.tario import is_remote, local_path

    key = json.dumps({"v": CACHE_VERSION, "network": identity, "data": source.fingerprint(), "n": n})
    name = f".gan_dist-refstats-{identity.split('-')[0]}-{n}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz"
    paths = []
    if isinstance(source, ShardSource) and not any(is_remote(u) for u in source.urls):
        parents = {Path(local_path(u)).resolve().parent for u in source.urls}
        if len(parents) == 1:
            parent = parents.pop()
            if os.access(parent, os.W_OK):
                paths.append(parent / name)
    paths.append(cache_dir() / "refstats" / name.lstrip("."))
    return paths


def _agreed(fn: Callable[[], Any]) -> Any:
    """fn() computed on rank 0 and shared; an error there is raised on every rank (no hang)."""
    from gan_dist.data import DataError

    value, error = None, None
    if gdist.rank() == 0:
        try:
            value = fn()
        except (SourceError, ConfigError, DataError, OSError) as exc:
            error = (type(exc).__name__, str(exc))
    value, error = gdist.broadcast_object((value, error))
    if error is not None:
        raise (ConfigError if error[0] == "ConfigError" else SourceError)(error[1])
    return value


def agreed_count(source: ImageSource, n: Optional[int], what: str, cap: bool = False) -> int:
    """The number of images every rank uses: n, all (None), or at most n (cap). Collective."""
    def resolve() -> tuple[int, Optional[list[int]]]:
        total = source.count()
        wanted = None if (n is None or (cap and total < n)) else n
        return source.resolve_n(wanted, what), getattr(source, "_counts", None)

    count, shard_counts = _agreed(resolve)
    if shard_counts is not None:
        source._counts = shard_counts  # type: ignore[attr-defined]
    return count


def dataset_references(source: ImageSource, extractors: dict[str, Extractor], n: int, batch_size: int = 250,
                       log: Callable[[str], None] = print, progress: bool = False) -> Optional[dict[str, Reference]]:
    """Reference statistics of the first n images of `source` for each network, on rank 0 (None
    elsewhere), read from the cache where present. Collective: on a miss every rank embeds its share."""
    paths = {role: reference_cache_paths(source, ex.identity, n) for role, ex in extractors.items()}
    found = _agreed(lambda: {role: next((str(p) for p in ps if p.is_file()), None) for role, ps in paths.items()})
    missing = {role: ex for role, ex in extractors.items() if found[role] is None}
    refs: dict[str, Reference] = {}
    if gdist.rank() == 0:
        for role, p in found.items():
            if p is not None:
                refs[role] = Reference.load(Path(p))
    if missing:
        started = time.time()
        outputs = source_outputs(source, missing, n, batch_size, progress, "real images")
        if gdist.rank() == 0:
            for role, ex in missing.items():
                feats = outputs[role]["features"].numpy()
                if len(feats) < 2:
                    raise SourceError(f"{source.description} gave {len(feats)} decodable image(s): too few for "
                                      "reference statistics")
                ref = Reference.from_features(feats, keep=None, stats=role == "main")
                meta = {"network": ex.identity, "images": ref.n, "data": source.fingerprint(),
                        "description": source.description, "seconds": round(time.time() - started, 2)}
                for path in paths[role]:
                    try:
                        ref.save(path, meta)
                        break
                    except OSError:
                        continue
                refs[role] = ref
                log(f"eval: reference statistics of {ref.n} images ({ex.name}) computed in "
                    f"{time.time() - started:.1f} s" + (f", cached in {ref.path}" if ref.path else ""))
    return refs if gdist.rank() == 0 else None


def dataset_reference(urls: Sequence[str], extractor: Extractor, channels: int, resolution: int,
                      batch_size: int = 256, max_images: int = 0, log: Callable[[str], None] = print,
                      ) -> Optional[Reference]:
    """One network's reference statistics of training shards (all images, or at most max_images)."""
    source = ShardSource(urls, channels, resolution)
    n = agreed_count(source, max_images or None, "data.urls", cap=True)
    refs = dataset_references(source, {"main": extractor}, n, batch_size, log)
    return None if refs is None else refs["main"]


# ---- embedding ------------------------------------------------------------------------------------
def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True,
                disable=not (enabled and gdist.rank() == 0), leave=False)


def _empty_outputs(extractors: dict[str, Extractor]) -> dict[str, dict[str, list[torch.Tensor]]]:
    return {role: defaultdict(list) for role in extractors}


def _embed_into(acc: dict, extractors: dict[str, Extractor], images: torch.Tensor) -> None:
    for role, ex in extractors.items():
        for key, value in ex(images).items():
            acc[role][key].append(value.cpu())


def _gather(acc: dict, extractors: dict[str, Extractor], keep: int, counts: list[int]) -> Optional[dict]:
    """The first `keep` local rows of every output, gathered on rank 0 in rank order."""
    out: dict[str, Outputs] = {}
    for role, ex in extractors.items():
        out[role] = {}
        for key, width in ex.outputs.items():
            parts = acc[role].get(key, [])
            local = torch.cat(parts)[:keep] if parts else torch.empty(0, width)
            out[role][key] = gather_rows(local.float(), counts)
    return out if gdist.rank() == 0 else None


def _uniform_batches(images: Iterable[torch.Tensor], batch_size: int, channels: set[int]) -> Iterator[torch.Tensor]:
    """uint8 images -> float batches in [-1, 1]; a batch holds images of one shape (mixed sizes are
    each resized by the network, as the reference tools do one image at a time). Records the
    channel counts seen in `channels`."""
    batch: list[torch.Tensor] = []
    for img in images:
        channels.add(int(img.shape[0]))
        if batch and (img.shape != batch[0].shape or len(batch) == batch_size):
            yield torch.stack(batch).float().div_(127.5).sub_(1.0)
            batch = []
        batch.append(img)
    if batch:
        yield torch.stack(batch).float().div_(127.5).sub_(1.0)


def source_outputs(source: ImageSource, extractors: dict[str, Extractor], n: int, batch_size: int,
                   progress: bool = False, desc: str = "images", channels: Optional[set[int]] = None,
                   ) -> Optional[dict[str, Outputs]]:
    """Every network's outputs for images 0..n-1 of `source`, on rank 0 in index order. Collective."""
    start, end = share(n, gdist.rank(), gdist.world_size())
    acc = _empty_outputs(extractors)
    local = 0
    with _progress(end - start, desc, progress) as bar:
        for batch in _uniform_batches(source.images(start, end), batch_size, set() if channels is None else channels):
            _embed_into(acc, extractors, batch)
            local += len(batch)
            bar.update(len(batch))
    counts = all_counts(local)  # fewer than the share where the shards held undecodable samples
    return _gather(acc, extractors, local, counts)


def generated_outputs(generate: Callable[[torch.Tensor], torch.Tensor], extractors: dict[str, Extractor], n: int,
                      nz: int, batch_size: int, seed: int = EVAL_SEED, device: Optional[torch.device] = None,
                      progress: bool = False) -> Optional[dict[str, Outputs]]:
    """Every network's outputs for generated samples 0..n-1, on rank 0 in index order. Collective.

    Every rank runs ceil(ceil(n / W) / batch_size) batches of the same sizes; rows beyond its
    share (at most one per rank) are dropped before gathering.
    """
    rank, world = gdist.rank(), gdist.world_size()
    start, end = share(n, rank, world)
    per_rank = math.ceil(n / world)
    z_all = latents(start, start + per_rank, nz, seed)
    acc = _empty_outputs(extractors)
    with _progress(end - start, "generated images", progress) as bar:
        for i in range(0, per_rank, batch_size):
            z = z_all[i:i + batch_size]
            _embed_into(acc, extractors, generate(z.to(device) if device is not None else z))
            bar.update(max(0, min(len(z), end - start - i)))
    return _gather(acc, extractors, end - start, share_counts(n, world))


def generated_features(generate: Callable[[torch.Tensor], torch.Tensor], extractor: Extractor, n: int, nz: int,
                       batch_size: int, seed: int = EVAL_SEED, device: Optional[torch.device] = None,
                       ) -> Optional[Outputs]:
    """One network's outputs of generated samples 0..n-1 (see generated_outputs)."""
    out = generated_outputs(generate, {"main": extractor}, n, nz, batch_size, seed, device)
    return None if out is None else out["main"]


# ---- the numbers --------------------------------------------------------------------------------
def compute_metrics(plan: MetricPlan, fake: dict[str, Outputs], refs: dict[str, Reference],
                    extractors: dict[str, Extractor], kid_subsets: int = 100, kid_subset_size: int = 1000,
                    coverage_threshold: float = 0.9) -> dict[str, float]:
    """The planned metrics of gathered generated outputs against the references (rank 0)."""
    from gan_dist.metrics.digits import coverage_from_probs

    out: dict[str, float] = {}
    m = plan.metrics
    if "main" in fake:
        main, ex = fake["main"], extractors["main"]
        x = main["features"].double().numpy()
        finite = bool(np.isfinite(x).all())  # a diverged generator: NaN images, NaN features
        if ex.fd_key in m:
            ref = refs["main"]
            out[ex.fd_key] = frechet_distance(*feature_stats(x), ref.mu, ref.sigma) if finite else float("nan")
        if "kid" in m:
            out["kid"], out["kid_std"] = (kernel_inception_distance(x, refs["main"].features, kid_subsets,
                                                                    kid_subset_size, seed=KID_SEED)
                                          if finite else (float("nan"), float("nan")))
        if "is" in m:
            out["is"], out["is_std"] = (inception_score(main["logits"]) if finite else (float("nan"), float("nan")))
        if "probs" in main:
            cov = coverage_from_probs(main["probs"], coverage_threshold)
            out["class_coverage"] = cov.covered
            out["confident_fraction"] = cov.confident_fraction
    if plan.pr:
        f = fake["pr"]["features"]
        if bool(torch.isfinite(f).all()):
            out["precision"], out["recall"] = precision_recall(f, torch.from_numpy(refs["pr"].features))
        else:
            out["precision"] = out["recall"] = float("nan")
    return out


class Evaluator:
    """Metrics of a generator against a data set's references, computed with all ranks. Collective."""

    def __init__(self, extractors: Union[Extractor, dict[str, Extractor]],
                 references: Union[Optional[Reference], Optional[dict[str, Reference]]], num_samples: int, nz: int,
                 batch_size: int = 250, kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = EVAL_SEED,
                 plan: Optional[MetricPlan] = None, progress: bool = False) -> None:
        if isinstance(extractors, Extractor):
            extractors = {"main": extractors}
            if isinstance(references, Reference):
                references = {"main": references}
        self.extractors = extractors
        self.references = references  # rank 0 only
        if plan is None:
            main = extractors["main"]
            plan = MetricPlan([main.fd_key, "kid", *(["is"] if "logits" in main.outputs else [])], main.name,
                              "pr" in extractors)
        self.plan = plan
        self.num_samples = num_samples
        self.nz = nz
        self.batch_size = batch_size
        self.kid_subsets = kid_subsets
        self.kid_subset_size = kid_subset_size
        self.seed = seed
        self.progress = progress

    @property
    def fd_key(self) -> Optional[str]:
        return self.extractors["main"].fd_key if "main" in self.extractors else None

    @property
    def metric_keys(self) -> list[str]:
        """The scalar results worth a curve: the metrics' names as they appear in logs."""
        keys = []
        for name in self.plan.metrics:
            keys += {"pr": ["precision", "recall"]}.get(name, [name])
        if self.plan.main == "digits":
            keys.append("class_coverage")
        return keys

    def run(self, generate: Callable[[torch.Tensor], torch.Tensor], device: Optional[torch.device] = None,
            ) -> dict[str, Any]:
        """Metrics of `generate` (latents -> images in [-1, 1]) on every rank."""
        started = time.time()
        fake = generated_outputs(generate, self.extractors, self.num_samples, self.nz, self.batch_size, self.seed,
                                 device, self.progress)
        result = None
        if fake is not None and self.references is not None:
            main = self.extractors.get("main")
            result = {"extractor": main.name if main else None, "num_samples": self.num_samples,
                      **compute_metrics(self.plan, fake, self.references, self.extractors, self.kid_subsets,
                                        self.kid_subset_size),
                      "reference_images": next(iter(self.references.values())).n,
                      "networks": {role: ex.identity for role, ex in self.extractors.items()}}
            result["seconds"] = round(time.time() - started, 3)
        return gdist.broadcast_object(result)


# ---- during training ------------------------------------------------------------------------------
def model_shape(cfg: Any) -> tuple[int, int, int]:
    """(channels, resolution, latent size) of the run's generator."""
    from gan_dist.models import model_spec

    spec = model_spec(cfg.model)
    return spec.channels, spec.resolution, spec.z_dim


def training_plan(eval_cfg: Any, demo: bool) -> Optional[MetricPlan]:
    """eval.metrics=auto: digits FD and KID on the demo data, FID and KID where the Inception weights
    are found, else None (no evaluation, with a note). An explicit list is planned as given."""
    from gan_dist.metrics.extractors import resolve_extractor_name

    if str(eval_cfg.metrics).strip().lower() != "auto":
        return plan_metrics(parse_metrics(eval_cfg.metrics), eval_cfg.extractor)
    name = resolve_extractor_name(eval_cfg, demo)
    if name is None:
        return None
    return plan_metrics(["digits_fd" if name == "digits" else "fid", "kid"], name)


def training_evaluator(cfg: Any, shards: Any, device: torch.device, is_main: bool) -> Optional[Evaluator]:
    """The evaluator a training run uses, or None (eval.enabled=false, or nothing to measure with).
    Collective. Raises ConfigError for metrics that cannot run here (missing weights, digits
    metrics on other images, an unknown metric)."""
    if not cfg.eval.enabled:
        return None
    demo = cfg.data.urls in (None, "", [])
    plan = training_plan(cfg.eval, demo)
    if plan is None:
        if is_main:
            print("gan_dist: note: no evaluation: eval.metrics=auto found no Inception weights for this dataset "
                  "(set eval.inception_weights or GAN_DIST_INCEPTION_WEIGHTS to measure FID/KID; docs/evaluation.md)",
                  file=sys.stderr, flush=True)
        return None
    extractors = build_extractors(plan, device, cfg.eval)
    channels, resolution, nz = model_shape(cfg)
    if "main" in extractors:
        extractors["main"].check_images(channels, resolution)
    urls = list(getattr(shards, "urls", shards))
    log = (lambda m: print(f"gan_dist: {m}", file=sys.stderr, flush=True)) if is_main else (lambda m: None)
    source = ShardSource(urls, channels, resolution)
    n = agreed_count(source, cfg.eval.reference_images or None, "data.urls", cap=True)
    refs = dataset_references(source, extractors, n, cfg.eval.batch_size, log)
    e = cfg.eval
    return Evaluator(extractors, refs, e.num_samples, nz, e.batch_size, e.kid_subsets, e.kid_subset_size, plan=plan)


# ---- two image sets (python -m gan_dist.evaluate --real ... --fake ...) ---------------------------
def _channel_note(channels: set[int], extractors: dict[str, Extractor]) -> list[str]:
    if 1 in channels and any(ex.name in ("inception", "vgg16") for ex in extractors.values()):
        return ["gray images repeated to RGB for the standard networks (as PIL's convert('RGB') in the reference tools)"]
    return []


def evaluate_images(real: ImageSource, fake: Union[ImageSource, Callable[[torch.Tensor], torch.Tensor]],
                    plan: MetricPlan, extractors: dict[str, Extractor], n: Optional[int], n_real: Optional[int] = None,
                    batch_size: int = 64, kid_subsets: int = 100, kid_subset_size: int = 1000, nz: int = 0,
                    fake_channels: int = 3, seed: int = EVAL_SEED, device: Optional[torch.device] = None,
                    progress: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The planned metrics of `fake` (an image set, or a generator: latents -> images in [-1, 1]) against
    `real`, on every rank. n: generated images, or the fake set's first n (None: all); n_real: the real
    set's first n_real (None: all). Collective."""
    started = time.time()
    num_real = agreed_count(real, n_real, "--real")
    refs = dataset_references(real, extractors, num_real, batch_size, log, progress)
    channels: set[int] = set()
    if callable(fake) and not isinstance(fake, ImageSource):
        if n is None:
            raise ConfigError("--n all needs an image set as --fake; give the number of images to generate")
        num_fake = n
        outputs = generated_outputs(fake, extractors, n, nz, batch_size, seed, device, progress)
        channels.add(fake_channels)
        notes: list[str] = []
    else:
        num_fake = agreed_count(fake, n, "--fake")
        outputs = source_outputs(fake, extractors, num_fake, batch_size, progress, "fake images", channels)
        notes = list(fake.notes)  # this rank's share: a gray image elsewhere is noted by its rank's share only
    result = None
    if gdist.rank() == 0:
        assert outputs is not None and refs is not None
        got = len(next(iter(next(iter(outputs.values())).values())))
        result = {"metrics": plan.metrics, **compute_metrics(plan, outputs, refs, extractors, kid_subsets,
                                                             kid_subset_size),
                  "num_fake": got, "num_real": next(iter(refs.values())).n,
                  "networks": {ex.name: ex.identity for ex in extractors.values()},
                  "notes": notes + list(real.notes) + _channel_note(channels, extractors),
                  "world_size": gdist.world_size(), "seconds": round(time.time() - started, 3)}
        if got != num_fake:
            result["notes"].append(f"{num_fake - got} of the {num_fake} fake images could not be decoded")
    return gdist.broadcast_object(result)
