"""`python -m gan_dist.generate`: grids, PNG folders and shards from a run directory or a
checkpoint, in one and in two processes (the same N images either way)."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests._mp import PYTHON, REPO, run, run_ranks
from tests.conftest import TINY

pytestmark = pytest.mark.timeout(400)
GENERATE = ["-m", "gan_dist.generate"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("gen") / "run"
    run([PYTHON, "-m", "gan_dist.train", *TINY, f"run.dir={run_dir}", "eval.enabled=false"], timeout=240, cwd=REPO)
    assert (run_dir / "generator_ema.pt").is_file() and (run_dir / "generator.pt").is_file()
    return run_dir


def generate(*args: str) -> dict:
    res = run([PYTHON, *GENERATE, *args], timeout=240, cwd=REPO)
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1, res.stdout
    return json.loads(lines[0])


def pngs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def test_grid_from_a_run_directory_uses_the_ema_generator(trained, tmp_path):
    out = generate("--ckpt", str(trained), "--n", "10", "--out", str(tmp_path / "grid.png"))
    assert out["ema"] is True and out["weights"].endswith("generator_ema.pt") and out["step"] == 4
    with Image.open(tmp_path / "grid.png") as img:
        # 10 images of 32 x 32 in rows of 3 (2 px padding): 3 columns, 4 rows
        assert img.size == (3 * 34 + 2, 4 * 34 + 2)
    raw = generate("--ckpt", str(trained), "--no-ema", "--n", "4", "--out", str(tmp_path / "raw.png"))
    assert raw["ema"] is False and raw["weights"].endswith("generator.pt")


def test_png_folder_two_processes_make_the_same_n_images_as_one(trained, tmp_path):
    one = tmp_path / "one"
    generate("--ckpt", str(trained), "--n", "7", "--batch-size", "3", "--out", str(one))
    ranks = run_ranks([*GENERATE, "--ckpt", str(trained), "--n", "7", "--batch-size", "2",
                       "--out", str(tmp_path / "two")], 2, timeout=240, cwd=REPO)
    assert json.loads(ranks[0].stdout)["world_size"] == 2 and ranks[1].stdout == ""
    a, b = pngs(one), pngs(tmp_path / "two")
    assert sorted(a) == sorted(b) == [f"{i:06d}.png" for i in range(7)]
    for name in a:
        assert a[name].shape == (32, 32)
        assert np.abs(a[name].astype(int) - b[name].astype(int)).max() <= 1, name  # rounding at most
    assert len({a[n].tobytes() for n in a}) == 7  # seven different images


def test_shards_from_two_processes_hold_every_index_once_with_a_manifest(trained, tmp_path):
    run_ranks([*GENERATE, "--ckpt", str(trained), "--n", "25", "--shard-size", "6",
               "--out", str(tmp_path / "gen" / "samples.tar")], 2, timeout=240, cwd=REPO)
    manifest = json.loads((tmp_path / "gen" / "manifest.json").read_text())
    assert manifest["total"] == 25 and manifest["resolution"] == 32 and manifest["channels"] == 1
    keys = []
    for shard in manifest["shards"]:
        with tarfile.open(tmp_path / "gen" / shard["name"]) as tar:
            names = tar.getnames()
        assert len(names) == shard["count"] <= 6
        keys += [n.split(".")[0] for n in names]
    assert sorted(int(k) for k in keys) == list(range(25))
    # the shards are a dataset gan_dist reads
    from gan_dist.data import expand_urls
    assert len(expand_urls(str(tmp_path / "gen"))) == len(manifest["shards"])


def test_generate_from_a_checkpoint_directory(trained, tmp_path):
    out = generate("--ckpt", str(trained / "checkpoints"), "--n", "3", "--out", str(tmp_path / "c"))
    assert out["ema"] is True and "step000000004" in out["weights"] and out["step"] == 4
    assert len(pngs(tmp_path / "c")) == 3
    # the checkpoint's EMA weights are the exported generator_ema.pt: the same images
    generate("--ckpt", str(trained), "--n", "3", "--out", str(tmp_path / "r"))
    a, b = pngs(tmp_path / "c"), pngs(tmp_path / "r")
    assert all(np.array_equal(a[n], b[n]) for n in a)


def test_find_checkpoint_follows_latest_from_a_run_directory_or_a_checkpoint_root(tmp_path):
    """`latest` decides, not the highest step (a newer directory may be an unfinished save)."""
    from gan_dist.checkpoint import find_checkpoint

    root = tmp_path / "run" / "checkpoints"
    for name in ("step000000004", "step000000008"):
        (root / name).mkdir(parents=True)
        (root / name / "trainer.pt").write_bytes(b"")
    (root / "latest").write_text("step000000004\n")
    assert find_checkpoint(tmp_path / "run") == root / "step000000004"
    assert find_checkpoint(root) == root / "step000000004"
    assert find_checkpoint(root / "step000000008") == root / "step000000008"
    (root / "latest").write_text("step000000006\n")  # names a directory that is gone
    assert find_checkpoint(tmp_path / "run") is None
    assert find_checkpoint(tmp_path) is None


@pytest.mark.parametrize("ckpt,message", [("/nonexistent/run", "does not exist"),
                                          ("EMPTY", "no generator.pt, generator_ema.pt, checkpoint")])
def test_bad_ckpt_is_a_clear_error(tmp_path, ckpt, message):
    if ckpt == "EMPTY":
        ckpt = str(tmp_path)
    res = run([PYTHON, *GENERATE, "--ckpt", ckpt, "--n", "2", "--out", str(tmp_path / "x.png")],
              timeout=120, cwd=REPO, check=False)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr


def test_generate_from_an_fsdp_checkpoint(tmp_path):
    """FSDP's checkpoint: the exported generator.pt, or (without it) the DCP shards, plus trainer.pt's EMA."""
    run_dir = tmp_path / "fsdp"
    run([PYTHON, "-m", "gan_dist.train", *TINY, "train.steps=2", "parallel.strategy=fsdp", f"run.dir={run_dir}"],
        timeout=240, cwd=REPO)
    ckpt = sorted((run_dir / "checkpoints").glob("step*"))[-1]
    assert (ckpt / "fsdp").is_dir()
    generate("--ckpt", str(run_dir), "--n", "3", "--out", str(tmp_path / "run"))
    generate("--ckpt", str(ckpt), "--n", "3", "--out", str(tmp_path / "ckpt"))
    (ckpt / "generator.pt").unlink(missing_ok=True)  # only the sharded state is left
    out = generate("--ckpt", str(ckpt), "--n", "3", "--out", str(tmp_path / "dcp"))
    assert out["ema"] is True
    a, b, c = pngs(tmp_path / "run"), pngs(tmp_path / "ckpt"), pngs(tmp_path / "dcp")
    assert len(a) == 3 and all(np.array_equal(a[n], b[n]) and np.array_equal(a[n], c[n]) for n in a)
