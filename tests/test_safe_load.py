"""A checkpoint from elsewhere (`train.resume=PATH`) must not run code: every file that resume
reads, whatever strategy wrote it, is replaced by a pickle whose __reduce__ runs a shell command,
the manifest rewritten to match, and the resume must refuse it clearly without running it."""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from gan_dist.checkpoint import MANIFEST, CheckpointError, file_digest
from gan_dist.faults import EXIT_CHECKPOINT
from gan_dist.parallel.safe_load import DEEPSPEED_DATA_CLASSES, refuse_code, weights_only_loads
from tests._ckpt import latest, train

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(300)]


class Evil:
    """Unpickling this runs `touch MARKER`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(ckpt: Path, name: str, marker: Path) -> None:
    """Replace `name` in checkpoint `ckpt` by a malicious file, with the manifest made to match."""
    target = ckpt / name
    assert target.is_file(), f"{name} not in the checkpoint: {sorted(p.name for p in ckpt.rglob('*'))}"
    if target.suffix == ".pt":
        torch.save({"state": Evil(marker)}, target)
    else:  # DCP's .metadata is a plain pickle
        target.write_bytes(pickle.dumps(Evil(marker)))
    manifest = json.loads((ckpt / MANIFEST).read_text())
    size, digest = file_digest(target)
    manifest["files"][name] = {"size": size, "sha256": digest}
    (ckpt / MANIFEST).write_text(json.dumps(manifest))


STRATEGIES = {
    "none": ["parallel.strategy=none"],
    "fsdp": ["parallel.strategy=fsdp"],
    "deepspeed2": ["parallel.strategy=deepspeed", "parallel.deepspeed.zero_stage=2"],
    "deepspeed3": ["parallel.strategy=deepspeed", "parallel.deepspeed.zero_stage=3"],
}
CASES = [
    ("none", "models.pt"),
    ("none", "rank00000.pt"),
    ("fsdp", "fsdp/.metadata"),
    ("fsdp", "fsdp_scalers.pt"),
    ("deepspeed2", "deepspeed/D/state/mp_rank_00_model_states.pt"),
    ("deepspeed2", "deepspeed/G/state/zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    ("deepspeed3", "deepspeed/G/state/zero_pp_rank_0_mp_rank_00_model_states.pt"),
    ("deepspeed3", "deepspeed/D/state/zero_pp_rank_0_mp_rank_00_optim_states.pt"),
]


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Path]:
    """One 2-step run per strategy (one process), written lazily: its newest checkpoint."""
    base = tmp_path_factory.mktemp("safe_load")
    cache: dict[str, Path] = {}

    def get(strategy: str) -> Path:
        if strategy not in cache:
            run_dir = base / strategy
            train(run_dir, "train.steps=2", "train.ckpt_every=2", *STRATEGIES[strategy])
            cache[strategy] = latest(run_dir)
        return cache[strategy]

    return get


@pytest.mark.parametrize("strategy, name", CASES, ids=[f"{s}-{n.rsplit('/', 1)[-1]}" for s, n in CASES])
def test_resume_refuses_a_checkpoint_file_that_would_run_code(tmp_path, written, strategy, name):
    ckpt = tmp_path / "from_elsewhere" / "step000000002"
    shutil.copytree(written(strategy), ckpt)
    marker = tmp_path / "pwned"
    plant(ckpt, name, marker)
    r = train(tmp_path / "run", "train.steps=3", f"train.resume={ckpt}", *STRATEGIES[strategy], check=False)
    assert not marker.exists(), f"unpickling {name} ran code"
    assert r.returncode == EXIT_CHECKPOINT, r.stderr[-3000:]
    assert name.rsplit("/", 1)[-1] in r.stderr, r.stderr[-3000:]  # the error names the file
    assert "system" in r.stderr, r.stderr[-3000:]  # and what it holds
    assert "Traceback" not in r.stderr, r.stderr[-3000:]


def test_untouched_sharded_checkpoints_still_resume(tmp_path, written):
    """The checks refuse code, not DeepSpeed's or DCP's own data (ZeRO-2's fragment addresses,
    ZeRO-3's stage enum and loss scaler, DCP's metadata classes). trainer.pt: test_checkpoint.py."""
    for strategy in ("fsdp", "deepspeed2", "deepspeed3"):
        ckpt = tmp_path / strategy / "step000000002"
        shutil.copytree(written(strategy), ckpt)
        r = train(tmp_path / f"run_{strategy}", "train.steps=3", f"train.resume={ckpt}", *STRATEGIES[strategy])
        assert "at step 2" in r.stderr, r.stderr[-3000:]


def test_a_library_that_asks_for_weights_only_false_gets_weights_only(tmp_path):
    """Defence in depth: inside weights_only_loads, torch.load(weights_only=False) refuses too."""
    marker = tmp_path / "pwned"
    f = tmp_path / "evil.pt"
    torch.save({"x": Evil(marker)}, f)
    with weights_only_loads(DEEPSPEED_DATA_CLASSES):
        with pytest.raises(pickle.UnpicklingError):
            torch.load(f, weights_only=False)
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
    with pytest.raises(CheckpointError, match=r"evil\.pt.*system.*refused"):
        refuse_code([f], DEEPSPEED_DATA_CLASSES)
    assert not marker.exists()
