"""The shard manifest (manifest.json) and the error every data module raises.

The writer, the URL resolver, the shape finder and the demo set all need these; keeping them
here, below all of them, is what lets each import the others' functions without a cycle.

A manifest written by `python -m gan_dist.shards` holds the shards (name, sample count,
bytes, SHA-256) and what the images are: `channels`, `resolution` (the side of every image,
or null when the sizes differ), `format`, `num_classes` (max `.cls` label + 1; 0 when no
sample has one) and `labelled` (samples with a `.cls`). Version 1 manifests lack the last two.
A WebDataset `wids` index ("shardlist" with "url" and "nsamples") is read as a manifest too.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from gan_dist.data.tario import is_remote

MANIFEST = "manifest.json"
MANIFEST_KIND = "gan_dist-shards"
MANIFEST_VERSION = 2  # 2: num_classes and labelled; resolution is the images' actual side
META_KEYS = ("resolution", "channels", "image_format", "num_classes", "labelled")


class DataError(ValueError):
    """A problem with `data.urls` or the shards it names; the message names the URL."""


def read_manifest(path: Path) -> dict[str, Any]:
    """A manifest as {"urls", "counts", "bytes", "resolution", "channels", "image_format",
    "num_classes", "labelled"}; URLs are absolute, missing values None."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"data.urls: manifest {str(path)!r} cannot be read: {exc}") from None
    if isinstance(meta, dict) and isinstance(meta.get("shards"), list):  # ours
        entries = [(s.get("name"), s.get("count"), s.get("bytes")) for s in meta["shards"] if isinstance(s, dict)]
    elif isinstance(meta, dict) and isinstance(meta.get("shardlist"), list):  # webdataset wids
        entries = [(s.get("url"), s.get("nsamples"), None) for s in meta["shardlist"] if isinstance(s, dict)]
    else:
        raise DataError(f"data.urls: {str(path)!r} is not a shard manifest (no 'shards' or 'shardlist' list)")
    urls, counts, sizes = [], [], []
    for name, count, size in entries:
        if not isinstance(name, str):
            raise DataError(f"data.urls: manifest {str(path)!r} has a shard entry without a name")
        urls.append(name if is_remote(name) or os.path.isabs(name) else str(path.parent / name))
        counts.append(int(count) if isinstance(count, int) else None)
        sizes.append(int(size) if isinstance(size, int) else None)
    out: dict[str, Any] = {"urls": urls, "counts": counts, "bytes": sizes}
    for key in META_KEYS:
        value = meta.get(key, meta.get("format") if key == "image_format" else None)
        out[key] = value
    return out


def write_manifest(out: str | Path, entries: list[dict[str, Any]], **meta: Any) -> Path:
    """manifest.json in `out` for the shard `entries`, replaced atomically."""
    path = Path(out) / MANIFEST
    manifest = {"kind": MANIFEST_KIND, "version": MANIFEST_VERSION, **meta,
                "total": int(sum(e["count"] for e in entries)), "shards": entries}
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, path)
    return path


__all__ = ["DataError", "MANIFEST", "MANIFEST_KIND", "MANIFEST_VERSION", "META_KEYS", "read_manifest",
           "write_manifest"]
