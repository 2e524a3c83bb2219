"""What the shards hold: channels, resolution and number of classes, so the model can follow.

The writer's manifest says it for free. Without one (shards made by other tools, or a v1
manifest that lacks a field) the first decodable sample gives channels and resolution, and a
pass over the tar headers that reads only the `.cls` members gives the classes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from gan_dist.data.decode import BadSample, decode_stored
from gan_dist.data.manifest import MANIFEST, DataError, read_manifest
from gan_dist.data.tario import (TarError, is_remote, iter_members, iter_samples, local_path, open_shard, shard_size,
                                 split_name)

SAMPLES_TRIED = 64  # undecodable samples skipped before the first sample gives up
CHANNEL_NAMES = {1: "grayscale", 2: "grayscale+alpha", 3: "RGB", 4: "RGBA or CMYK"}


@dataclass(frozen=True)
class DataShape:
    """The images' shape as the data says it; `origin` names the files it was read from, for
    messages such as "model.channels=1 but the data is RGB (manifest /data/x/manifest.json)"."""

    channels: int  # 1 (grayscale) or 3 (RGB)
    resolution: int  # side of the square images
    num_classes: Optional[int]  # max `.cls` label + 1; 0: no labels; None: not looked for
    source: str  # "manifest", "first sample", or "manifest and first sample"
    origin: str  # the manifest path(s) and/or "sample KEY of SHARD"


def data_shape(urls: Sequence[str], scan_labels: bool = True) -> DataShape:
    """The shape of the images in `urls` (the resolved shard list, `ShardSet.urls`).

    A manifest.json beside the shards that lists every one of them is used first; a field it
    lacks (or every field, without one) comes from the first decodable sample. Without a
    manifest that counts labels, the number of classes needs one pass over all shards reading
    only `.cls` members (`scan_labels=False` skips it: num_classes is then None).
    DataError names the shard or manifest when the data has no usable shape (no decodable
    sample, images that are not square, an alpha channel, manifests that disagree, bad labels).
    """
    if not urls:
        raise DataError("data.urls names no shards, so the data has no shape")
    found = _manifests(urls) or {}
    values = {key: _agreed(found, key) if found else None for key in ("channels", "resolution", "num_classes")}
    origins = sorted(found)
    from_sample = values["channels"] is None or values["resolution"] is None
    if from_sample:
        channels, resolution, where = _first_sample(urls)
        values["channels"] = values["channels"] or channels
        values["resolution"] = values["resolution"] or resolution
        origins.append(where)
    if values["num_classes"] is None and scan_labels:
        values["num_classes"] = _scan_labels(urls)
    source = ("manifest and first sample" if found and from_sample else "first sample" if from_sample
              else "manifest")
    channels = int(values["channels"])
    if channels not in (1, 3):
        raise DataError(f"data: {origins[0]} gives {channels} channels; only 1 (grayscale) and 3 (RGB) are "
                        "supported: rewrite the shards with python -m gan_dist.shards --channels 1 or 3")
    return DataShape(channels=channels, resolution=int(values["resolution"]),
                     num_classes=None if values.get("num_classes") is None else int(values["num_classes"]),
                     source=source, origin="; ".join(origins))


def _manifests(urls: Sequence[str]) -> Optional[dict[str, dict[str, Any]]]:
    """{manifest path: its fields} when every shard is listed in the manifest.json of its
    folder, else None (remote shards have no folder to look in)."""
    listed: dict[Path, Optional[tuple[str, dict[str, Any], set[str]]]] = {}
    used: dict[str, dict[str, Any]] = {}
    for url in urls:
        if is_remote(url):
            return None
        path = Path(local_path(url)).resolve()
        folder = path.parent
        if folder not in listed:
            listed[folder] = None
            if (folder / MANIFEST).is_file():
                m = read_manifest(folder / MANIFEST)
                listed[folder] = (str(folder / MANIFEST), m, {str(Path(u).resolve()) for u in m["urls"]})
        entry = listed[folder]
        if entry is None or str(path) not in entry[2]:
            return None
        used[entry[0]] = entry[1]
    return used


def _agreed(manifests: dict[str, dict[str, Any]], key: str) -> Any:
    """The manifests' common value of `key`; None if one lacks it. Classes: the largest."""
    seen = {path: m.get(key) for path, m in manifests.items()}
    if any(v is None for v in seen.values()):
        return None
    if key == "num_classes":
        return max(seen.values())
    (first, value), *rest = seen.items()
    for other, v in rest:
        if v != value:
            raise DataError(f"data: the shards disagree on {key}: {value} in {first!r}, {v} in {other!r}; "
                            "train on one of them or rewrite them with python -m gan_dist.shards")
    return value


def _first_sample(urls: Sequence[str]) -> tuple[int, int, str]:
    """(channels, resolution, "sample KEY of SHARD") of the first sample that decodes."""
    tried, problems = 0, []
    for url in urls:
        try:
            stream = open_shard(url)
        except OSError as exc:
            problems.append(f"{url!r} cannot be opened: {exc}")
            continue
        try:
            with stream:
                for _, key, members in iter_samples(stream, size=shard_size(url, stream)):
                    tried += 1
                    try:
                        img = decode_stored(members)
                    except BadSample as exc:
                        problems.append(f"sample {key!r} of {url!r}: {exc}")
                    else:
                        return _checked(img.shape, f"sample {key!r} of {url!r}")
                    if tried >= SAMPLES_TRIED:
                        break
        except (TarError, OSError, EOFError) as exc:
            problems.append(f"{url!r} is not a readable tar shard: {exc}")
        if tried >= SAMPLES_TRIED:
            break
    detail = "; ".join(problems[:3]) or f"{urls[0]!r} holds no samples"
    raise DataError(f"data: no sample of the first {max(tried, 1)} decodes, so the image shape is unknown "
                    f"({detail}); check the shards with python -m gan_dist.shards --verify DIR")


def _checked(shape: tuple[int, ...], where: str) -> tuple[int, int, str]:
    c, h, w = shape
    if h != w:
        raise DataError(f"data: {where} is {w}x{h}, not square; rewrite the shards with "
                        "python -m gan_dist.shards --resolution R (centre-crops to R x R)")
    if c not in (1, 3):
        raise DataError(f"data: {where} is a {CHANNEL_NAMES.get(c, f'{c}-channel')} image; rewrite the shards "
                        "with python -m gan_dist.shards --channels 3 (or 1)")
    return c, h, where


def _scan_labels(urls: Sequence[str]) -> int:
    """max `.cls` label + 1 over all shards (0 without labels), reading no image bytes."""
    return len(class_counts(urls))


def class_counts(urls: Sequence[str]) -> list[int]:
    """Samples per class (index: the `.cls` label) over all shards, reading no image bytes; []
    without labels. A shard that ends early is scanned as far as it goes (the reader counts
    what it lost)."""
    counts: dict[int, int] = {}
    for url in urls:
        try:
            stream = open_shard(url)
        except OSError as exc:
            raise DataError(f"data: shard {url!r} cannot be opened to read its labels: {exc}") from None
        try:
            with stream:
                for name, data in iter_members(stream, want=lambda n: split_name(n)[1] == "cls",
                                               size=shard_size(url, stream)):
                    if data is None:
                        continue
                    try:
                        label = int(data.decode("ascii").strip())
                    except (UnicodeDecodeError, ValueError):
                        label = -1
                    if label < 0:
                        raise DataError(f"data: {name!r} in shard {url!r} is not a class index "
                                        f"(a non-negative integer): {data[:20]!r}")
                    counts[label] = counts.get(label, 0) + 1
        except (TarError, EOFError, OSError):
            continue
    return [counts.get(k, 0) for k in range(max(counts) + 1)] if counts else []


__all__ = ["DataShape", "class_counts", "data_shape"]
