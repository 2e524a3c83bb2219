"""Small real tar shards for the data tests, written with Python's tarfile (not our writer), with
images whose pixels are a function of their key, and every kind of bad data on request."""
from __future__ import annotations

import io
import tarfile
import zlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

RES = 8


def image_for(key: str, channels: int = 1, resolution: int = RES) -> np.ndarray:
    """uint8 (H, W, C): a per-key level plus a ramp along x (so a mirror image differs)."""
    base = zlib.crc32(key.encode()) % 97
    y, x = np.mgrid[0:resolution, 0:resolution]
    img = (base + 11 * x + y) % 256
    return np.stack([(img + 40 * c) % 256 for c in range(channels)], axis=-1).astype(np.uint8)


def encode_png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(buf, format="PNG")
    return buf.getvalue()


def encode_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, keys: Sequence[str], fmt: str = "png", channels: int = 1,
                bad: Optional[dict[str, str]] = None, resolution: int = RES) -> None:
    """One shard of `keys`; `bad` maps a key to what is wrong with it: corrupt | wrong_size |
    wrong_mode | no_image."""
    bad = bad or {}
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key in keys:
            kind = bad.get(key)
            arr = image_for(key, channels, resolution)
            if kind == "wrong_size":
                arr = image_for(key, channels, resolution * 2)
            elif kind == "wrong_mode":
                arr = image_for(key, 4 if channels == 3 else 3, resolution)
            data = encode_npy(arr) if fmt == "npy" else encode_png(arr)
            if kind == "corrupt":
                data = data[: len(data) // 2]
            ext = "xyz" if kind == "no_image" else fmt
            add(tar, f"{key}.{ext}", data)
            add(tar, f"{key}.cls", b"0")


def make_shards(root: Path, sizes: Sequence[int], fmt: str = "png", channels: int = 1,
                bad: Optional[dict[str, str]] = None, prefix: str = "part",
                resolution: int = RES) -> tuple[list[str], list[str]]:
    """Shards of the given sizes (0: a valid empty tar); returns (urls, all keys)."""
    root.mkdir(parents=True, exist_ok=True)
    urls, keys = [], []
    for s, n in enumerate(sizes):
        ks = [f"s{s:02d}i{i:03d}" for i in range(n)]
        path = root / f"{prefix}-{s:06d}.tar"
        write_shard(path, ks, fmt, channels, bad, resolution)
        urls.append(str(path))
        keys.extend(ks)
    return urls, keys


def truncate(path: Path, keep_fraction: float = 0.6) -> None:
    """Cut a shard short, as an interrupted copy would."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep_fraction)])


def data_cfg(urls: object, **overrides: object) -> object:
    """A DataConfig with test-friendly defaults."""
    from gan_dist.config import DataConfig

    cfg = DataConfig(urls=urls, num_workers=0, shuffle_buffer=16)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg
