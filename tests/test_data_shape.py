"""The data's shape (channels, resolution, classes) from the writer's manifest or the first sample,
on real shards written by the writer."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gan_dist.data import DataError, resolve_shards
from gan_dist.data.shape import data_shape
from gan_dist.data.writer import ShardSink, WriteOptions, encode, write_folder
from tests.workers.data_shards import data_cfg

pytestmark = pytest.mark.timeout(300)
QUIET = lambda m: None  # noqa: E731


def images(root: Path, channels: int, side: int, classes: tuple[str, ...] = ("",), per_class: int = 3) -> None:
    """Noise images of `side` px in the given class folders ("" is the top folder)."""
    rng = np.random.default_rng(0)
    for cls in classes:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = (side, side) if channels == 1 else (side, side, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / cls / f"{i}.png")


def shards_of(tmp_path: Path, channels: int, fmt: str, classes: tuple[str, ...], side: int = 12,
              resolution: int | None = None) -> tuple[list[str], Path]:
    images(tmp_path / "src", channels, side, classes)
    out = tmp_path / "shards"
    write_folder(tmp_path / "src", out, "x", WriteOptions(resolution, channels, fmt), max_count=4, progress=False)
    return resolve_shards(data_cfg(str(out)), need_counts=False, log=QUIET).urls, out


@pytest.mark.parametrize("fmt", ["png", "raw"])
@pytest.mark.parametrize("channels", [1, 3])
def test_shape_from_the_manifest_and_without_it_from_the_first_sample(tmp_path, fmt, channels):
    # labels 0 and 2 ("a" and "c"; "b" has no images): classes are max label + 1
    (tmp_path / "src" / "b").mkdir(parents=True)
    urls, out = shards_of(tmp_path, channels, fmt, ("a", "c"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["channels"], manifest["resolution"], manifest["num_classes"], manifest["labelled"]) == (
        channels, 12, 3, 6)
    shape = data_shape(urls)
    assert (shape.channels, shape.resolution, shape.num_classes, shape.source) == (channels, 12, 3, "manifest")
    assert shape.origin == str(out / "manifest.json")

    (out / "manifest.json").unlink()
    urls = resolve_shards(data_cfg(str(out)), need_counts=False, log=QUIET).urls
    shape = data_shape(urls)
    assert (shape.channels, shape.resolution, shape.num_classes, shape.source) == (
        channels, 12, 3, "first sample")
    assert "x-000000.tar" in shape.origin
    assert data_shape(urls, scan_labels=False).num_classes is None


@pytest.mark.parametrize("fmt", ["png", "raw"])
def test_resized_shards_without_labels_have_no_classes(tmp_path, fmt):
    urls, out = shards_of(tmp_path, 3, fmt, ("",), side=20, resolution=8)
    assert data_shape(urls) == data_shape(urls, scan_labels=False)
    shape = data_shape(urls)
    assert (shape.channels, shape.resolution, shape.num_classes) == (3, 8, 0)
    (out / "manifest.json").unlink()
    shape = data_shape(urls)
    assert (shape.channels, shape.resolution, shape.num_classes, shape.source) == (3, 8, 0, "first sample")


def test_a_version_1_manifest_fills_its_gaps_from_the_data(tmp_path):
    urls, out = shards_of(tmp_path, 1, "png", ("a", "b"))
    path = out / "manifest.json"
    manifest = json.loads(path.read_text())
    for key in ("num_classes", "labelled"):
        del manifest[key]
    manifest.update(version=1, resolution=None)  # v1 recorded --resolution, None when not given
    path.write_text(json.dumps(manifest))
    shape = data_shape(urls)
    assert (shape.channels, shape.resolution, shape.num_classes) == (1, 12, 2)
    assert shape.source == "manifest and first sample" and str(path) in shape.origin


def raw_shard(folder: Path, arrays: list[np.ndarray], labels: list[bytes] | None = None) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    sink = ShardSink(folder, "t", max_count=100)
    for i, arr in enumerate(arrays):
        members = {"npy": encode(arr, "raw")}
        if labels:
            members["cls"] = labels[i]
        sink.write(f"{i:04d}", members)
    return [str(folder / e["name"]) for e in sink.close()]


def test_data_without_a_usable_shape_is_an_error_naming_the_shard(tmp_path):
    urls = raw_shard(tmp_path / "wide", [np.zeros((8, 16, 3), np.uint8)])
    with pytest.raises(DataError, match=r"sample '0000' of '.*wide/t-000000\.tar' is 16x8, not square.*--resolution"):
        data_shape(urls)
    urls = raw_shard(tmp_path / "rgba", [np.zeros((8, 8, 4), np.uint8)])
    with pytest.raises(DataError, match=r"rgba/t-000000\.tar' is a RGBA or CMYK image.*--channels"):
        data_shape(urls)
    urls = raw_shard(tmp_path / "label", [np.zeros((8, 8, 3), np.uint8)], [b"cat"])
    with pytest.raises(DataError, match=r"'0000\.cls' in shard '.*label/t-000000\.tar' is not a class index"):
        data_shape(urls)
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"x" * 2048)
    with pytest.raises(DataError, match=r"no sample .* decodes.*broken\.tar' is not a readable tar shard"):
        data_shape([str(broken)])


def test_manifests_that_disagree_are_named_both(tmp_path):
    gray, _ = shards_of(tmp_path / "g", 1, "raw", ("",))
    rgb, _ = shards_of(tmp_path / "c", 3, "raw", ("",))
    with pytest.raises(DataError, match=r"disagree on channels: .*g/shards/manifest\.json.*c/shards/manifest\.json"):
        data_shape(gray + rgb)
    # shards of two folders that agree: classes are the largest of both
    more, _ = shards_of(tmp_path / "g2", 1, "raw", ("a", "b"))
    shape = data_shape(gray + more)
    assert (shape.channels, shape.num_classes, shape.source) == (1, 2, "manifest")
