"""The shard writer: round trips through the reader, conversions, manifest, CLI, the demo set."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gan_dist.data.decode import decode_sample
from gan_dist.data.tario import iter_samples, open_shard
from gan_dist.data.writer import WriteOptions, load_image, write_folder
from tests._mp import PYTHON, run

pytestmark = pytest.mark.timeout(300)
RES = 16


def source_images(root: Path, n_per_class: int = 6, flat: bool = False) -> dict[bytes, tuple[np.ndarray, str]]:
    """RGB PNGs at RES in two class folders plus two at the top; {pixels: (image, class)}.
    Noise, or flat colours (which JPEG keeps almost exactly)."""
    rng = np.random.default_rng(1)
    out = {}
    for cls in ("apples", "pears", ""):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class if cls else 2):
            if flat:
                arr = np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (RES, RES, 3)).copy()
            else:
                arr = rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"img{i}.png")
            out[arr.tobytes()] = (arr, cls)
    (root / "apples" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "README.txt").write_text("not an image")
    return out


def read_back(out: Path) -> list[tuple[str, np.ndarray, dict]]:
    manifest = json.loads((out / "manifest.json").read_text())
    samples = []
    for entry in manifest["shards"]:
        with open_shard(str(out / entry["name"])) as f:
            for _, key, members in iter_samples(f):
                img = decode_sample(members, manifest["channels"], RES)
                samples.append((key, np.ascontiguousarray(img.transpose(1, 2, 0)), members))
    return samples


@pytest.mark.parametrize("fmt", ["png", "raw", "jpg"])
def test_folder_round_trip(tmp_path, fmt):
    src = source_images(tmp_path / "src", flat=fmt == "jpg")
    manifest = write_folder(tmp_path / "src", tmp_path / "out", "fruit", WriteOptions(RES, 3, fmt),
                            max_count=5, workers=2, progress=False)
    samples = read_back(tmp_path / "out")
    assert len(samples) == len(src) == manifest["total"] == 14
    assert [s["count"] for s in manifest["shards"]] == [5, 5, 4]
    assert manifest["classes"] == ["apples", "pears"]
    assert manifest["skipped"]["count"] == 1 and manifest["skipped"]["files"][0]["path"].endswith("broken.png")
    assert len({k for k, _, _ in samples}) == 14
    for key, img, members in samples:
        if fmt == "jpg":  # lossy: the closest source image, and close to it
            arr, cls = min(src.values(), key=lambda v: np.abs(v[0].astype(int) - img).mean())
            assert np.abs(arr.astype(int) - img).max() <= 3
        else:
            arr, cls = src[img.tobytes()]  # exactly one of the sources
        want = {"apples": b"0", "pears": b"1"}.get(cls)
        assert members.get("cls") == want
    for entry in manifest["shards"]:
        data = (tmp_path / "out" / entry["name"]).read_bytes()
        assert len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"]


def test_parallel_writing_gives_the_same_bytes(tmp_path):
    source_images(tmp_path / "src")
    one = write_folder(tmp_path / "src", tmp_path / "one", "x", WriteOptions(RES, 3, "png"), workers=1, progress=False)
    two = write_folder(tmp_path / "src", tmp_path / "two", "x", WriteOptions(RES, 3, "png"), workers=2, progress=False)
    assert [s["sha256"] for s in one["shards"]] == [s["sha256"] for s in two["shards"]]


def test_modes_are_converted_to_the_configured_channels(tmp_path):
    rgb = np.zeros((RES, RES, 3), np.uint8)
    rgb[:, :, 0] = 200
    rgb[:, :, 2] = 50
    rgba = np.dstack([rgb, np.full((RES, RES), 255, np.uint8)])
    rgba[:4, :, 3] = 0  # transparent rows: composited on white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    got = load_image(tmp_path / "rgba.png", 3, None)
    assert np.array_equal(got[:4], np.full((4, RES, 3), 255)) and np.array_equal(got[4:], rgb[4:])

    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "p.png")
    assert np.array_equal(load_image(tmp_path / "p.png", 3, None), rgb)

    gray = np.arange(RES * RES, dtype=np.uint8).reshape(RES, RES)
    Image.fromarray(gray, "L").save(tmp_path / "l.png")
    assert np.array_equal(load_image(tmp_path / "l.png", 3, None), np.repeat(gray[:, :, None], 3, axis=2))
    assert np.array_equal(load_image(tmp_path / "l.png", 1, None)[:, :, 0], gray)

    Image.fromarray(rgb).convert("L").save(tmp_path / "expected_l.png")
    assert np.array_equal(load_image(tmp_path / "p.png", 1, None),
                          np.asarray(Image.open(tmp_path / "expected_l.png"))[:, :, None])

    wide = (gray.astype(np.uint16) * 257)  # 16-bit: 0..65535 scaled back to 0..255
    Image.fromarray(wide).save(tmp_path / "i16.png")
    assert np.array_equal(load_image(tmp_path / "i16.png", 1, None)[:, :, 0], gray)

    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    assert np.abs(load_image(tmp_path / "cmyk.jpg", 3, None).astype(int) - rgb).max() <= 8


def test_center_crop_then_resize(tmp_path):
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :10] = (255, 0, 0)
    img[:, 30:] = (255, 0, 0)
    img[:, 10:30] = (0, 255, 0)  # the centred 20 x 20 square
    Image.fromarray(img).save(tmp_path / "wide.png")
    crop = load_image(tmp_path / "wide.png", 3, 20)
    assert crop.shape == (20, 20, 3) and np.array_equal(crop, np.broadcast_to([0, 255, 0], (20, 20, 3)))
    small = load_image(tmp_path / "wide.png", 3, 5)
    assert small.shape == (5, 5, 3) and np.abs(small.astype(int) - [0, 255, 0]).max() <= 1


def test_cli_writes_reports_and_verifies(tmp_path):
    source_images(tmp_path / "src")
    out = tmp_path / "shards"
    cmd = [PYTHON, "-m", "gan_dist.shards", "--src", str(tmp_path / "src"), "--out", str(out), "--resolution",
           str(RES), "--format", "raw", "--max-size", "2K", "--workers", "2", "--no-progress"]
    res = run(cmd, timeout=120)
    assert "skipped" in res.stderr and "broken.png" in res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "raw" and manifest["resolution"] == RES and manifest["channels"] == 3
    assert all(s["count"] == 1 for s in manifest["shards"])  # one 16x16 raw sample (> 1K) per 2K shard
    assert len(manifest["shards"]) == 14
    again = run(cmd, timeout=120, check=False)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert run([PYTHON, "-m", "gan_dist.shards", "--verify", str(out)], timeout=60).returncode == 0
    shard = out / manifest["shards"][3]["name"]
    data = bytearray(shard.read_bytes())
    data[700] ^= 1
    shard.write_bytes(bytes(data))
    bad = run([PYTHON, "-m", "gan_dist.shards", "--verify", str(out)], timeout=60, check=False)
    assert bad.returncode == 1 and shard.name in bad.stderr and "SHA-256" in bad.stderr
    missing = run([PYTHON, "-m", "gan_dist.shards", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
                  timeout=60, check=False)
    assert missing.returncode == 2 and "nope" in missing.stderr and "Traceback" not in missing.stderr


def test_demo_shards_hold_the_digits_exactly(tmp_path):
    from gan_dist.data.demo import DEMO_SHARDS, demo_images, ensure_demo_shards
    from gan_dist.metrics.digits import digits_to_tensor_32, load_digits_arrays

    urls = ensure_demo_shards(tmp_path)
    assert len(urls) == DEMO_SHARDS and all(Path(u).is_file() for u in urls)
    images, labels = demo_images()
    raw, _ = load_digits_arrays()
    x = digits_to_tensor_32(raw)
    seen = set()
    for url in urls:
        with open_shard(url) as f:
            for _, key, members in iter_samples(f):
                i = int(key)
                img = decode_sample(members, 1, 32)[0]
                assert np.array_equal(img, images[i])
                assert int(members["cls"]) == labels[i]
                # as the loader scales it: within half a grey level of the canonical conversion
                scaled = torch.from_numpy(img.astype(np.float32)) / 127.5 - 1
                assert (scaled - x[i, 0]).abs().max() <= 0.5 / 127.5 + 1e-6
                seen.add(i)
    assert seen == set(range(1797))


def test_cli_demo_as_raw_shards(tmp_path):
    from gan_dist.data.demo import demo_images

    run([PYTHON, "-m", "gan_dist.shards", "--demo", "--out", str(tmp_path), "--format", "raw", "--max-count", "600",
         "--workers", "1", "--no-progress"], timeout=120)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [s["count"] for s in manifest["shards"]] == [600, 600, 597]
    images, _ = demo_images()
    for entry in manifest["shards"][:1]:
        with open_shard(str(tmp_path / entry["name"])) as f:
            for _, key, members in iter_samples(f):
                assert np.array_equal(decode_sample(members, 1, 32)[0], images[int(key)])
