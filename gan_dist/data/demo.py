"""The built-in demo dataset: scikit-learn's bundled handwritten digits as WebDataset shards.

1797 images of 8x8 pixels ship inside scikit-learn, so the demo needs no network. They are
upscaled to 32x32 once (`digits_to_tensor_32`, the same conversion the digits metrics use),
written by the shard writer as 16 PNG shards with a manifest into a cache directory, and from
then on read like any user dataset.
"""
from __future__ import annotations

import fcntl
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from gan_dist.data.writer import WriteOptions, iter_jobs_from_arrays, write_shards

DEMO_NAME = "digits32-v2"
DEMO_SHARDS = 16  # enough for 8 ranks x 2 workers to get whole shards


def cache_dir() -> Path:
    """`$GAN_DIST_CACHE`, else `$XDG_CACHE_HOME/gan_dist`, else ~/.cache/gan_dist."""
    if os.environ.get("GAN_DIST_CACHE"):
        return Path(os.environ["GAN_DIST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gan_dist"


def demo_urls(root: Path | None = None) -> list[str]:
    root = (root or cache_dir()) / DEMO_NAME
    return [str(root / f"digits-{i:06d}.tar") for i in range(DEMO_SHARDS)]


def ensure_demo_shards(root: Path | None = None) -> list[str]:
    """Write the demo shards unless they exist; safe when several processes call it at once.

    The shards are written into a temporary directory and renamed into place, under a file
    lock, so a reader never sees a half-written shard.
    """
    root = root or cache_dir()
    final = root / DEMO_NAME
    urls = demo_urls(root)
    if (final / "manifest.json").is_file():
        return urls
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{DEMO_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (final / "manifest.json").is_file():
            tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_NAME}-", dir=root))
            try:
                write_demo(tmp)
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return urls


def demo_images() -> tuple[np.ndarray, np.ndarray]:
    """All demo images as uint8 (N, 32, 32) and their labels, exactly as stored in the shards."""
    from gan_dist.metrics.digits import digits_to_tensor_32, load_digits_arrays

    images, labels = load_digits_arrays()
    x = digits_to_tensor_32(images)  # N x 1 x 32 x 32 in [-1, 1]
    u8 = ((x[:, 0] + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return u8.numpy(), labels


def write_demo(out: Path, fmt: str = "png", resolution: int | None = None, workers: int = 1,
               progress: bool = False, max_count: int | None = None) -> dict:
    """The demo digits as shards of `max_count` samples (default: DEMO_SHARDS shards; classes
    mixed across shards) with a manifest, upscaled to `resolution` when given."""
    images, labels = demo_images()
    order = np.random.default_rng(0).permutation(len(images))  # mix classes across shards
    jobs = list(iter_jobs_from_arrays(images, labels, order))
    return write_shards(jobs, out, "digits", WriteOptions(resolution=resolution or 32, channels=1, fmt=fmt),
                        max_count=max_count or math.ceil(len(jobs) / DEMO_SHARDS), max_size=1 << 40, workers=workers,
                        key_width=6, progress=progress, report=lambda m: None,
                        classes=[str(i) for i in range(10)], source="sklearn.datasets.load_digits")
