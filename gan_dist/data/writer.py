"""Writing image datasets as WebDataset tar shards with a manifest (`python -m gan_dist.shards`).

Images are prepared once, at write time, so that training reads exactly what the model
takes: modes are converted to the configured channels (transparency composited on white,
16-bit scaled to 8-bit, palette/CMYK converted), EXIF orientation applied, and with
`resolution` the largest centred square is cropped and resized (Lanczos). Preparing and
encoding run in a process pool; one writer process appends the results in order, so the
same input and seed always give byte-identical shards.

Each sample is `{key}.{png|jpg|npy}` plus `{key}.cls` (the class index, ASCII) when the
image sits in a sub-folder (the class, as with torchvision's ImageFolder). `raw` stores the
decoded uint8 array (H, W, C) as .npy, so reading it costs no decode. The manifest
(manifest.json) lists every shard with its sample count, size and SHA-256, plus what the
written images are (resolution: their side, or null when sizes differ; channels; format;
num_classes: max label + 1; labelled: samples with a label), the class names, and the files
that could not be read.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from gan_dist.data.manifest import MANIFEST, DataError, write_manifest

FORMATS = {"png": "png", "jpg": "jpg", "raw": "npy"}  # --format -> member extension
SOURCE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_SKIPPED_LISTED = 10_000


# ---- one image ------------------------------------------------------------------------------
def to_channels(img: Any, channels: int) -> Any:
    """A PIL image in mode L (channels=1) or RGB (channels=3)."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba).convert("RGB")
    target = "L" if channels == 1 else "RGB"
    if img.mode != target:
        img = img.convert("RGB").convert(target) if img.mode not in ("L", "RGB") else img.convert(target)
    return img


def center_crop_resize(img: Any, resolution: int) -> Any:
    from PIL import Image

    w, h = img.size
    s = min(w, h)
    if (w, h) != (s, s):
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
    if s != resolution:
        img = img.resize((resolution, resolution), Image.LANCZOS)
    return img


def load_image(path: str | Path, channels: int, resolution: Optional[int]) -> np.ndarray:
    """An image file as uint8 (H, W, C), converted, cropped and resized as configured."""
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        if resolution and img.format == "JPEG":  # decode at a reduced scale when it is large
            img.draft("L" if channels == 1 else "RGB", (resolution, resolution))
        img = ImageOps.exif_transpose(img)
        img = to_channels(img, channels)
        if resolution:
            img = center_crop_resize(img, resolution)
        arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def prepare_array(arr: np.ndarray, resolution: Optional[int]) -> np.ndarray:
    """An in-memory uint8 image (H, W) or (H, W, C), resized like a file would be."""
    from PIL import Image

    if resolution and arr.shape[:2] != (resolution, resolution):
        img = Image.fromarray(arr[:, :, 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)
        arr = np.asarray(center_crop_resize(img, resolution), dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def encode(arr: np.ndarray, fmt: str, quality: int = 95) -> bytes:
    """uint8 (H, W, C) -> the bytes of a `fmt` member."""
    if fmt == "raw":
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
        return buf.getvalue()
    from PIL import Image

    img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG")
    elif fmt == "jpg":
        img.save(buf, format="JPEG", quality=quality)
    else:
        raise ValueError(f"unknown shard format {fmt!r} (png, jpg or raw)")
    return buf.getvalue()


# ---- tar shards -----------------------------------------------------------------------------
class _HashingFile:
    """A file that hashes what is written to it, so a shard's checksum costs no second read."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def write(self, b: bytes) -> int:
        self.sha.update(b)
        self.n += len(b)
        return self.f.write(b)

    def tell(self) -> int:
        return self.n

    def flush(self) -> None:
        self.f.flush()


class ShardSink:
    """Writes samples into `{name}-000000.tar`, `{name}-000001.tar`, ... in `out`, starting a
    new shard at `max_count` samples or before `max_size` bytes; each shard appears under its
    final name only when complete."""

    def __init__(self, out: str | Path, name: str, max_count: int = 10_000, max_size: int = 1 << 30) -> None:
        self.out, self.name = Path(out), name
        self.max_count, self.max_size = max_count, max_size
        self.entries: list[dict[str, Any]] = []
        self._tar: Optional[tarfile.TarFile] = None
        self._file: Optional[BinaryIO] = None
        self._hash: Optional[_HashingFile] = None
        self._count = 0
        self._size = 0

    def _open(self) -> None:
        path = self.out / f"{self.name}-{len(self.entries):06d}.tar"
        self._path = path
        self._file = open(path.with_suffix(".tar.partial"), "wb")
        self._hash = _HashingFile(self._file)
        self._tar = tarfile.open(fileobj=self._hash, mode="w", format=tarfile.USTAR_FORMAT)  # type: ignore[arg-type]
        self._count, self._size = 0, 0

    def _close_shard(self) -> None:
        assert self._tar is not None and self._file is not None and self._hash is not None
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._path.with_suffix(".tar.partial"), self._path)
        self.entries.append({"name": self._path.name, "count": self._count, "bytes": self._hash.n,
                             "sha256": self._hash.sha.hexdigest()})
        self._tar = None

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if "." in key or not key:
            raise ValueError(f"sample key {key!r} must be non-empty and contain no '.'")
        size = sum(512 + len(d) + (-len(d)) % 512 for d in members.values())
        if self._tar is not None and (self._count >= self.max_count or
                                      (self._count and self._size + size > self.max_size)):
            self._close_shard()
        if self._tar is None:
            self._open()
        assert self._tar is not None
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self._size += size

    def close(self) -> list[dict[str, Any]]:
        if self._tar is not None:
            self._close_shard()
        return self.entries


# ---- a folder tree ----------------------------------------------------------------------------
@dataclass
class Job:
    """One sample to prepare: an image file, or an in-memory array."""

    index: int
    label: Optional[int]
    path: Optional[str] = None
    array: Optional[np.ndarray] = None


@dataclass
class WriteOptions:
    resolution: Optional[int] = None
    channels: int = 3
    fmt: str = "png"
    quality: int = 95


Prepared = tuple[int, Optional[int], Optional[bytes], Optional[tuple[int, ...]], Optional[str], Optional[str]]


def _prepare(args: tuple[Job, WriteOptions]) -> Prepared:
    """(index, label, encoded bytes or None, (H, W, C), path, error) - runs in the pool."""
    job, opt = args
    try:
        if job.array is not None:
            arr = prepare_array(job.array, opt.resolution)
        else:
            assert job.path is not None
            arr = load_image(job.path, opt.channels, opt.resolution)
        return job.index, job.label, encode(arr, opt.fmt, opt.quality), tuple(arr.shape), job.path, None
    except Exception as exc:  # noqa: BLE001 - any unreadable image is skipped and reported
        return job.index, job.label, None, None, job.path, f"{type(exc).__name__}: {exc}"


def _common(values: set[Any]) -> Any:
    return next(iter(values)) if len(values) == 1 else None


def find_images(src: str | Path) -> tuple[list[tuple[str, Optional[int]]], list[str]]:
    """(image paths with class index, class names): classes are the first-level sub-folders."""
    root = Path(src)
    if not root.is_dir():
        raise DataError(f"--src {str(src)!r} is not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    class_index = {c: i for i, c in enumerate(classes)}
    files: list[tuple[str, Optional[int]]] = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = Path(folder).relative_to(root)
        label = class_index.get(rel.parts[0]) if rel.parts else None
        for n in sorted(names):
            if n.lower().endswith(SOURCE_EXTS) and not n.startswith("."):
                files.append((os.path.join(folder, n), label))
    return files, classes


def write_shards(jobs: Sequence[Job], out: str | Path, name: str, opt: WriteOptions, max_count: int,
                 max_size: int, workers: int = 1, key_width: int = 9, progress: bool = True,
                 report: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
                 **meta: Any) -> dict[str, Any]:
    """Prepare, encode and write `jobs` in order; returns the manifest."""
    from tqdm import tqdm

    if opt.fmt not in FORMATS:
        raise DataError(f"--format {opt.fmt!r} is not one of: {', '.join(FORMATS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sink = ShardSink(out, name, max_count, max_size)
    ext = FORMATS[opt.fmt]
    skipped: list[dict[str, str]] = []
    n_skipped = 0
    # what the images turned out to be, for the manifest: a model can take its shape from it
    sides: set[Optional[int]] = set()
    channels: set[int] = set()
    labelled, num_classes = 0, 0
    started = time.time()
    bar = tqdm(total=len(jobs), desc=f"shards {name}", unit="img", disable=not progress, file=sys.stderr,
               dynamic_ncols=True, mininterval=0.5)
    items: Iterable[Any]
    pool = None
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        pool = mp.get_context("fork" if os.name == "posix" else "spawn").Pool(workers)
        items = pool.imap(_prepare, ((j, opt) for j in jobs), chunksize=max(1, min(64, len(jobs) // (workers * 8) or 1)))
    else:
        items = map(_prepare, ((j, opt) for j in jobs))
    try:
        for index, label, data, shape, path, error in items:
            bar.update(1)
            if data is None:
                n_skipped += 1
                if len(skipped) < MAX_SKIPPED_LISTED:
                    skipped.append({"path": str(path), "error": str(error)})
                bar.write(f"skipped {path}: {error}", file=sys.stderr)
                continue
            assert shape is not None
            sides.add(shape[0] if shape[0] == shape[1] else None)
            channels.add(shape[2])
            members = {ext: data}
            if label is not None:
                members["cls"] = str(label).encode()
                labelled += 1
                num_classes = max(num_classes, label + 1)
            sink.write(f"{index:0{key_width}d}", members)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        bar.close()
    entries = sink.close()
    if not entries:
        raise DataError(f"no image could be written to {str(out)!r} ({n_skipped} skipped)")
    manifest_meta = {"name": name, "format": opt.fmt, "resolution": _common(sides), "channels": _common(channels),
                     "num_classes": num_classes, "labelled": labelled,
                     **meta, "skipped": {"count": n_skipped, "files": skipped}}
    path = write_manifest(out, entries, **manifest_meta)
    total = sum(e["count"] for e in entries)
    report(f"wrote {total} samples in {len(entries)} shards to {out} ({n_skipped} skipped, "
           f"{time.time() - started:.1f} s); manifest: {path}")
    return json.loads(path.read_text())


def write_folder(src: str | Path, out: str | Path, name: Optional[str] = None, opt: Optional[WriteOptions] = None,
                 max_count: int = 10_000, max_size: int = 1 << 30, workers: int = 1, seed: Optional[int] = 0,
                 progress: bool = True) -> dict[str, Any]:
    """A folder tree of images -> shards. `seed` shuffles the order (None keeps path order)."""
    opt = opt or WriteOptions()
    files, classes = find_images(src)
    if not files:
        raise DataError(f"--src {str(src)!r} holds no images ({', '.join(SOURCE_EXTS)})")
    order = np.arange(len(files)) if seed is None else np.random.default_rng(seed).permutation(len(files))
    jobs = [Job(index=k, label=files[i][1], path=files[i][0]) for k, i in enumerate(order)]
    name = name or (Path(src).resolve().name or "data")
    return write_shards(jobs, out, name, opt, max_count, max_size, workers, progress=progress,
                        classes=classes, source=str(Path(src).resolve()), seed=seed)


# ---- verification -------------------------------------------------------------------------------
def verify(path: str | Path) -> list[str]:
    """Problems with a manifest's shards (missing, wrong size or checksum); empty when all is well."""
    path = Path(path)
    manifest = path / MANIFEST if path.is_dir() else path
    try:
        meta = json.loads(manifest.read_text())
    except (OSError, ValueError) as exc:
        return [f"{manifest}: cannot be read: {exc}"]
    problems = []
    for entry in meta.get("shards", []):
        shard = manifest.parent / entry["name"]
        if not shard.is_file():
            problems.append(f"{shard}: missing")
            continue
        size = shard.stat().st_size
        if entry.get("bytes") is not None and size != entry["bytes"]:
            problems.append(f"{shard}: {size} bytes, manifest says {entry['bytes']}")
            continue
        sha = hashlib.sha256()
        with open(shard, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                sha.update(chunk)
        if entry.get("sha256") and sha.hexdigest() != entry["sha256"]:
            problems.append(f"{shard}: SHA-256 differs from the manifest")
    return problems


def iter_jobs_from_arrays(images: np.ndarray, labels: Optional[Sequence[int]] = None,
                          order: Optional[Sequence[int]] = None) -> Iterator[Job]:
    """Jobs for in-memory uint8 images, keyed by their index in `images`."""
    idx = range(len(images)) if order is None else order
    for i in idx:
        yield Job(index=int(i), label=None if labels is None else int(labels[i]), array=images[i])


__all__ = ["FORMATS", "Job", "ShardSink", "WriteOptions", "center_crop_resize", "encode", "find_images",
           "load_image", "prepare_array", "to_channels", "verify", "write_folder", "write_manifest",
           "write_shards", "iter_jobs_from_arrays"]
