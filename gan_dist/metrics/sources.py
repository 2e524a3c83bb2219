"""Where evaluated images come from: a folder of image files or WebDataset shards.

A source has a fingerprint (for the cache key of its reference statistics), a count, and
hands out the images of an index range [start, end) in a fixed order, so that each rank takes
its share (`shares.share`) and exactly N images are embedded in total, each once.
Images come out as uint8 (C, H, W) tensors, C = 1 (gray) or 3 (RGB), at their stored size.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class SourceError(ValueError):
    """A folder or shard set that cannot be evaluated; the message names it and what to do."""


class ImageSource:
    description: str = ""
    notes: list[str]

    def fingerprint(self) -> str:
        raise NotImplementedError

    def count(self) -> int:
        raise NotImplementedError

    def images(self, start: int, end: int) -> Iterator[torch.Tensor]:
        raise NotImplementedError

    def resolve_n(self, n: Optional[int], what: str) -> int:
        """The number of images to use: `n` (an error if there are fewer), or all (n=None)."""
        total = self.count()
        if n is None:
            if total < 2:
                raise SourceError(f"{what} {self.description}: {total} image(s); at least 2 are needed")
            return total
        if total < n:
            raise SourceError(f"{what} {self.description} holds {total} images, fewer than --n {n}: lower --n or "
                              "use --n all (every image)" if what == "--fake" else
                              f"{what} {self.description} holds {total} images, fewer than {n}: lower the number "
                              "(--n-real) or use all")
        return n


def _read_image(path: Path, notes: list[str]) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "RGB"):
                if not any(n.startswith("mode") for n in notes):
                    notes.append(f"mode {img.mode} images (e.g. {path.name}) converted to RGB")
                img = img.convert("RGB")
            arr = np.array(img, dtype=np.uint8)
    except OSError as exc:
        raise SourceError(f"image {str(path)!r} cannot be read: {exc}") from None
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


class FolderSource(ImageSource):
    """Every image file under a folder (sub-folders too), in sorted order of relative paths."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise SourceError(f"{str(root)!r} is not a folder of images")
        self.files = sorted((p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                            key=lambda p: p.relative_to(self.root).as_posix())
        self.description = f"folder {str(root)!r}"
        self.notes = []

    def fingerprint(self) -> str:
        h = hashlib.sha1()
        for p in self.files:
            st = p.stat()
            h.update(f"{p.relative_to(self.root).as_posix()}\0{st.st_size}\0{int(st.st_mtime)}\n".encode())
        return f"folder:{self.root.resolve()}:{h.hexdigest()[:16]}"

    def count(self) -> int:
        return len(self.files)

    def images(self, start: int, end: int) -> Iterator[torch.Tensor]:
        for path in self.files[start:end]:
            yield _read_image(path, self.notes)


class ShardSource(ImageSource):
    """The images of WebDataset shards, in shard order. With `channels`/`resolution` set (the
    training data), each image must have that shape; otherwise images are taken as stored."""

    def __init__(self, urls: Sequence[str], channels: Optional[int] = None, resolution: Optional[int] = None) -> None:
        self.urls = list(urls)
        if not self.urls:
            raise SourceError("no shards given")
        self.channels, self.resolution = channels, resolution
        self.description = f"{len(self.urls)} shard(s) ({self.urls[0]!r}{', ...' if len(self.urls) > 1 else ''})"
        self.notes = []
        self.skipped = 0
        self._counts: Optional[list[int]] = None

    def fingerprint(self) -> str:
        from gan_dist.data.tario import is_remote, local_path

        sig = []
        for url in self.urls:
            if is_remote(url):
                sig.append([url])
            else:
                st = os.stat(local_path(url))
                sig.append([os.path.abspath(local_path(url)), st.st_size, int(st.st_mtime)])
        key = json.dumps({"shards": sig, "channels": self.channels, "resolution": self.resolution})
        return f"shards:{hashlib.sha1(key.encode()).hexdigest()[:16]}"

    def counts(self) -> list[int]:
        if self._counts is None:
            from gan_dist.data.index import count_shard

            self._counts = [count_shard(u)[0] for u in self.urls]
        return self._counts

    def count(self) -> int:
        return sum(self.counts())

    def _decode(self, members: dict) -> Optional[torch.Tensor]:
        from gan_dist.data.decode import BadSample, decode_sample, decode_stored

        try:
            if self.channels is not None and self.resolution is not None:
                img = decode_sample(members, self.channels, self.resolution)
            else:
                img = decode_stored(members)
        except BadSample:
            self.skipped += 1
            return None
        return torch.from_numpy(np.array(img, dtype=np.uint8))

    def _iter_shard(self, url: str, lo: int, hi: int) -> Iterator[torch.Tensor]:
        from gan_dist.data.tario import iter_samples, open_shard, shard_size

        with open_shard(url) as stream:
            for index, _, members in iter_samples(stream, want=lambda i: lo <= i < hi, size=shard_size(url, stream)):
                if index >= hi:
                    break
                if index >= lo:
                    img = self._decode(members)
                    if img is not None:
                        yield img

    def images(self, start: int, end: int) -> Iterator[torch.Tensor]:
        offset = 0
        for url, n in zip(self.urls, self.counts()):
            if offset >= end:
                break
            if offset + n > start:
                yield from self._iter_shard(url, max(0, start - offset), min(n, end - offset))
            offset += n


def open_source(spec: str) -> ImageSource:
    """A folder of images, or shards: a .tar file, a brace pattern, a folder of .tar files or a manifest."""
    path = Path(spec)
    if path.is_dir() and next((p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES), None) is not None:
        return FolderSource(path)
    from gan_dist.data.index import expand_urls

    if not path.is_dir() and not any(c in spec for c in "{*") and not path.exists():
        raise SourceError(f"{spec!r}: no such folder or shard")
    try:
        urls = expand_urls(spec)
    except Exception as exc:  # DataError and friends: one message naming the input
        raise SourceError(f"{spec!r}: neither a folder of images nor shards ({exc})") from None
    return ShardSource(urls)
