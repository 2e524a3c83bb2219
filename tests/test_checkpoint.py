"""Checkpoint files: atomic saves, manifests, damaged checkpoints, mismatches, unwritable or
full disks."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from gan_dist.checkpoint import (FORMAT, LATEST, MANIFEST, CheckpointError, Checkpointer, load_model_state,
                                 rng_state, set_rng_state, verify)
from gan_dist.config import load_config, to_dict, to_yaml
from gan_dist.distributed import DistInfo
from gan_dist.faults import EXIT_CHECKPOINT
from gan_dist.build import setup_models
from gan_dist.parallel import build_strategy
from tests._ckpt import latest, models, step_of, train, train_cmd
from tests._mp import PYTHON, REPO, run

INFO = DistInfo(0, 1, 0, 1, 0, torch.device("cpu"), None, "python")
TINY_MODEL = ["model.resolution=32", "model.channels=1", "model.dcgan.ngf=8", "model.dcgan.ndf=8", "model.dcgan.nz=16", "train.precision=fp32"]


def make(*overrides: str):
    cfg = load_config(None, [*TINY_MODEL, *overrides])
    strategy = build_strategy(INFO, cfg)
    setup_models(strategy, cfg, seed=1)
    return cfg, strategy


def train_a_little(strategy, steps: int = 1) -> None:
    from gan_dist.loop import Batch, train_step
    from gan_dist.recipe import build_recipe

    recipe = build_recipe(load_config(None, TINY_MODEL))
    g = torch.Generator().manual_seed(steps)
    for _ in range(steps):
        real = torch.rand(4, 1, 32, 32, generator=g) * 2 - 1
        z = torch.randn(4, 16, generator=g)
        train_step(strategy, recipe, [[Batch(real, z)]])


def save(ckpt: Checkpointer, cfg, strategy, step: int) -> Path:
    trainer_state = {"format": FORMAT, "step": step, "images_seen": 4 * step, "world_size": 1,
                     "strategy": strategy.name, "config": to_dict(cfg), "guard": {}, "ema": None}
    rank_state = {"rank": 0, "rng": rng_state(INFO.device), "noise": None, "data": None, "batches_drawn": step}
    return ckpt.save(step, strategy, trainer_state, rank_state, to_yaml(cfg))


def test_save_is_complete_verified_and_keeps_the_newest(tmp_path):
    cfg, strategy = make()
    ckpt = Checkpointer(tmp_path, keep=2, info=INFO)
    for step in (1, 2, 3):
        train_a_little(strategy)
        path = save(ckpt, cfg, strategy, step)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST, "step000000002", "step000000003"]
    assert (tmp_path / LATEST).read_text().strip() == "step000000003" == path.name
    manifest = json.loads((path / MANIFEST).read_text())
    assert set(manifest["files"]) == {"models.pt", "trainer.pt", "rank00000.pt", "config.yaml"}
    for name, entry in manifest["files"].items():
        assert (path / name).stat().st_size == entry["size"]
    assert verify(path) is None
    # the saved state is exactly what the strategy holds
    saved = models(path)
    for n in ("G", "D"):
        for k, v in strategy.raw[n].state_dict().items():
            assert torch.equal(saved["models"][n][k], v)


def test_load_restores_models_optimizers_and_rng(tmp_path):
    cfg, strategy = make()
    train_a_little(strategy, 2)
    ckpt = Checkpointer(tmp_path, keep=3, info=INFO)
    torch.manual_seed(123)
    path = save(ckpt, cfg, strategy, 2)
    expected = torch.rand(3)
    want = {n: {k: v.clone() for k, v in strategy.raw[n].state_dict().items()} for n in ("G", "D")}
    want_opt = strategy.optimizers["D"].state_dict()["state"][0]["exp_avg"].clone()
    _, fresh = make()
    trainer_state, rank_state = ckpt.load(ckpt.find(None), fresh, to_dict(cfg))
    assert trainer_state["step"] == 2 and rank_state["batches_drawn"] == 2
    for n in ("G", "D"):
        for k, v in fresh.raw[n].state_dict().items():
            assert torch.equal(v, want[n][k]), f"{n}.{k}"
    assert torch.equal(fresh.optimizers["D"].state_dict()["state"][0]["exp_avg"], want_opt)
    set_rng_state(rank_state["rng"], INFO.device)
    assert torch.equal(torch.rand(3), expected)
    assert path.name == "step000000002"


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "manifest_sha", "no_manifest", "missing_file"])
def test_damaged_newest_checkpoint_is_skipped_with_a_warning(tmp_path, capsys, damage):
    cfg, strategy = make()
    ckpt = Checkpointer(tmp_path, keep=3, info=INFO)
    train_a_little(strategy)
    good = save(ckpt, cfg, strategy, 1)
    train_a_little(strategy)
    bad = save(ckpt, cfg, strategy, 2)
    target = bad / "models.pt"
    if damage == "truncate":
        os.truncate(target, target.stat().st_size // 2)
    elif damage == "flip_byte":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "manifest_sha":
        m = json.loads((bad / MANIFEST).read_text())
        m["files"]["trainer.pt"]["sha256"] = "0" * 64
        (bad / MANIFEST).write_text(json.dumps(m))
    elif damage == "no_manifest":
        (bad / MANIFEST).unlink()
    else:
        (bad / "rank00000.pt").unlink()
    assert verify(bad) is not None
    found = Checkpointer(tmp_path, keep=3, info=INFO).find(None)
    assert found == good
    err = capsys.readouterr().err
    assert "step000000002" in err and "damaged" in err and "previous" in err
    # moved aside, kept for inspection; the next save at step 2 is a fresh, valid checkpoint
    assert not bad.exists() and (tmp_path / "step000000002.corrupt").is_dir()
    _, fresh = make()
    state, _ = ckpt.load(found, fresh, to_dict(cfg))
    assert state["step"] == 1
    again = save(ckpt, cfg, fresh, 2)
    assert verify(again) is None
    assert (tmp_path / LATEST).read_text().strip() == "step000000002"


def test_all_damaged_means_a_fresh_start_and_explicit_damaged_resume_is_an_error(tmp_path, capsys):
    cfg, strategy = make()
    ckpt = Checkpointer(tmp_path / "a", keep=3, info=INFO)
    path = save(ckpt, cfg, strategy, 1)
    os.truncate(path / "trainer.pt", 10)
    other = Checkpointer(tmp_path / "b", keep=3, info=INFO)
    with pytest.raises(CheckpointError, match="damaged.*trainer.pt"):
        other.find(str(path))
    assert Checkpointer(tmp_path / "a", keep=3, info=INFO).find(None) is None
    assert "damaged" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="no such directory"):
        other.find(str(tmp_path / "nope"))


def test_resume_from_another_run_directory(tmp_path):
    cfg, strategy = make()
    src = Checkpointer(tmp_path / "old" / "checkpoints", keep=3, info=INFO)
    save(src, cfg, strategy, 1)
    newest = save(src, cfg, strategy, 5)
    mine = Checkpointer(tmp_path / "new" / "checkpoints", keep=3, info=INFO)
    assert mine.find(str(tmp_path / "old")) == newest
    assert mine.find(str(newest.parent / "step000000001")).name == "step000000001"
    # once this run has its own checkpoint, it continues from that one
    own = save(mine, cfg, strategy, 7)
    assert mine.find(str(tmp_path / "old")) == own


def test_model_config_mismatch_names_the_keys(tmp_path):
    cfg, strategy = make()
    ckpt = Checkpointer(tmp_path, keep=3, info=INFO)
    path = save(ckpt, cfg, strategy, 1)
    cfg16, other = make("model.resolution=32", "model.channels=1", "model.dcgan.ngf=16", "model.dcgan.nz=32")
    with pytest.raises(CheckpointError) as e:
        ckpt.load(path, other, to_dict(cfg16))
    msg = str(e.value)
    assert "model.dcgan.ngf: checkpoint 8, this run 16" in msg and "model.dcgan.nz: checkpoint 16, this run 32" in msg
    assert str(path) in msg


def test_shape_mismatch_names_the_parameter():
    _, strategy = make()
    state = {k: v.clone() for k, v in strategy.raw["G"].state_dict().items()}
    key = next(k for k, v in state.items() if v.dim() == 4)
    state[key] = torch.zeros(1, 2, 3, 4)
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        load_model_state(strategy.raw["G"], state, "G")
    assert f"{key}: checkpoint (1, 2, 3, 4)" in str(e.value) and "extra.weight" in str(e.value)


def test_loading_never_runs_code_from_a_checkpoint(tmp_path):
    cfg, strategy = make()
    ckpt = Checkpointer(tmp_path, keep=3, info=INFO)
    path = save(ckpt, cfg, strategy, 1)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"format": FORMAT, "evil": Evil()}, path / "trainer.pt")
    m = json.loads((path / MANIFEST).read_text())
    from gan_dist.checkpoint import file_digest
    size, digest = file_digest(path / "trainer.pt")
    m["files"]["trainer.pt"] = {"size": size, "sha256": digest}
    (path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="cannot read checkpoint file"):
        ckpt.load(ckpt.find(None), strategy, to_dict(cfg))
    assert not marker.exists()


def test_unwritable_checkpoint_root_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointError, match="cannot write checkpoints into .*a_file/ckpt.*writable"):
        Checkpointer(blocker / "ckpt", keep=3, info=INFO)


# ---- real processes: a read-only directory and a full disk -----------------------------------
def readonly_dir(path: Path) -> Path:
    """A directory this test's processes cannot write: a read-only tmpfs for root (permissions do
    not stop root), mode 0555 otherwise."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        return path
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs: {r.stderr.decode().strip()}")
    return path


@pytest.mark.timeout(300)
def test_read_only_checkpoint_dir_fails_fast_with_a_clear_error(tmp_path):
    ro = readonly_dir(tmp_path / "ro")
    try:
        r = train(tmp_path / "run", "train.steps=3", f"train.ckpt_dir={ro / 'ckpt'}", check=False)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(ro)], check=False)
    assert r.returncode == EXIT_CHECKPOINT, r.stderr[-3000:]
    assert f"cannot write checkpoints into '{ro / 'ckpt'}'" in r.stderr
    assert "Read-only file system" in r.stderr or "Permission denied" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "generator.pt").exists()


@pytest.mark.timeout(300)
def test_full_disk_during_a_save_keeps_latest_and_the_previous_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir, "train.steps=2", "train.ckpt_every=2")
    first = latest(run_dir)
    assert first is not None and step_of(first) == 2
    limit = (first / "models.pt").stat().st_size // 2  # every other file of the run stays below it
    small_disk = run([PYTHON, str(REPO / "tests" / "workers" / "ckpt_fsize.py"), str(limit),
                      *train_cmd(run_dir, "train.steps=4", "train.ckpt_every=2")],
                     timeout=240, check=False, cwd=REPO)
    r = small_disk
    assert r.returncode == EXIT_CHECKPOINT, r.stderr[-3000:]
    assert "saving checkpoint step000000004" in r.stderr and "File too large" in r.stderr
    assert "The previous checkpoint step000000002 is intact" in r.stderr
    ckpts = run_dir / "checkpoints"
    assert latest(run_dir) == first and verify(first) is None
    assert sorted(p.name for p in ckpts.iterdir()) == [LATEST, "step000000002"]  # no partial left behind
    # and the run continues from it once the disk has room
    r = train(run_dir, "train.steps=4", "train.ckpt_every=2")
    assert "resumed from" in r.stderr and "at step 2" in r.stderr
    assert step_of(latest(run_dir)) == 4


def test_a_checkpoint_of_the_older_config_layout_is_read_in_todays_layout(tmp_path):
    """Before model families had sections, DCGAN's settings were model.nz/ngf/ndf/norm and there
    was no reg section: such a checkpoint fits a run with the same settings in today's keys."""
    from gan_dist.checkpoint import check_compatible
    from gan_dist.config import to_dict

    cfg, _ = make()
    old = to_dict(cfg)
    old["model"].update(old["model"].pop("dcgan"))
    del old["model"]["num_classes"], old["reg"]
    state = {"format": FORMAT, "config": old, "strategy": "none", "world_size": 1}
    warnings = check_compatible(state, to_dict(cfg), "none", 1, tmp_path)
    assert any("latents" in w for w in warnings)
    other, _ = make("model.dcgan.ngf=16")
    with pytest.raises(CheckpointError, match=r"model\.dcgan\.ngf: checkpoint 8, this run 16"):
        check_compatible(state, to_dict(other), "none", 1, tmp_path)
