"""Streaming reader for WebDataset tar shards, split by rank (node) and then by loader worker.

Each loader worker of each rank reads a disjoint part of the data in every epoch, reshuffles
shards and samples with seeds derived from (run.seed, epoch, rank, worker), and loops over
epochs forever; the training loop decides when to stop. That keeps every rank stepping in
lockstep (a fixed number of steps, never "until my data runs out"), so uneven shards cannot
hang a distributed job.
"""
from __future__ import annotations

import glob
import io
import os
import random
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


class DataError(ValueError):
    """A problem with `data.urls` or the shards it names; the message names the URL."""


def expand_urls(urls: str | Sequence[str], allow_pipe: bool = False) -> list[str]:
    """Brace patterns, lists, directories (every *.tar inside) -> a list of shard URLs."""
    import braceexpand

    items = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for item in items:
        for url in braceexpand.braceexpand(item):
            if url.startswith("pipe:") or "://" in url:
                if not allow_pipe:
                    raise DataError(
                        f"data.urls: {url!r} is a remote or pipe: URL; a pipe: URL runs a shell command, "
                        "so it is refused unless data.allow_pipe=true")
                out.append(url)
                continue
            path = Path(url.removeprefix("file:"))
            if path.is_dir():
                found = sorted(glob.glob(str(path / "*.tar")))
                if not found:
                    raise DataError(f"data.urls: directory {str(path)!r} holds no .tar shards")
                out.extend(found)
            elif path.is_file():
                out.append(str(path))
            else:
                raise DataError(f"data.urls: shard {url!r} does not exist")
    if not out:
        raise DataError(f"data.urls={urls!r} names no shards")
    return out


def decode_image(data: bytes, channels: int, resolution: int) -> torch.Tensor:
    """Image bytes -> float tensor (C, R, R) in [-1, 1]."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        if img.size != (resolution, resolution):
            raise ValueError(f"image is {img.size[0]}x{img.size[1]}, expected {resolution}x{resolution}")
        arr = np.asarray(img, dtype=np.uint8)
    t = torch.from_numpy(arr.copy())
    t = t.unsqueeze(0) if channels == 1 else t.permute(2, 0, 1)
    return t.float().div_(127.5).sub_(1.0)


class ShardStream(IterableDataset):
    """Endless, epoch-by-epoch stream of decoded images for one rank."""

    def __init__(self, urls: list[str], rank: int, world_size: int, seed: int, channels: int,
                 resolution: int, shuffle_buffer: int = 1000, flip: bool = False) -> None:
        super().__init__()
        self.urls, self.rank, self.world_size, self.seed = urls, rank, world_size, seed
        self.channels, self.resolution = channels, resolution
        self.shuffle_buffer, self.flip = shuffle_buffer, flip

    def _my_part(self, epoch: int, worker: int, num_workers: int) -> tuple[list[str], int, int]:
        """(shards to read, sample stride, sample offset) for this rank and worker."""
        shards = list(self.urls)
        random.Random(self.seed * 1_000_003 + epoch).shuffle(shards)
        slots = self.world_size * num_workers
        slot = self.rank * num_workers + worker
        if len(shards) >= slots:
            return shards[self.rank::self.world_size][worker::num_workers], 1, 0
        # Fewer shards than readers: everyone reads every shard and keeps every slots-th sample.
        return shards, slots, slot

    def __iter__(self) -> Iterator[torch.Tensor]:
        import webdataset as wds

        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        for epoch in range(2**62):
            shards, stride, offset = self._my_part(epoch, worker, num_workers)
            rng = random.Random(hash((self.seed, epoch, self.rank, worker)))
            samples = wds.tarfile_to_samples()([{"url": u} for u in shards])
            buffer: list[torch.Tensor] = []
            for n, sample in enumerate(samples):
                if n % stride != offset:
                    continue
                key = next((k for k in IMAGE_EXTS if k in sample), None)
                if key is None:
                    continue
                img = decode_image(sample[key], self.channels, self.resolution)
                if self.flip and rng.random() < 0.5:
                    img = img.flip(-1)
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(img)
                    continue
                j = rng.randrange(len(buffer))
                buffer[j], img = img, buffer[j]
                yield img
            rng.shuffle(buffer)
            yield from buffer


def build_loader(urls: Sequence[str], data_cfg: Any, model_cfg: Any, batch_size: int, seed: int,
                 rank: int, world_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """An endless iterator of real batches (B, C, R, R) on `device`."""
    ds = ShardStream(list(urls), rank, world_size, seed, model_cfg.channels, model_cfg.resolution,
                     data_cfg.shuffle_buffer, data_cfg.flip)
    workers = data_cfg.num_workers
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                        prefetch_factor=data_cfg.prefetch_factor if workers > 0 else None,
                        multiprocessing_context="fork" if workers > 0 and os.name == "posix" else None)
    for batch in loader:
        yield batch.to(device, non_blocking=True)
