"""The training entry point under real launchers: one job of world size N, one run directory,
bitwise-reproducible weights."""
from __future__ import annotations

import hashlib
import json
import pkgutil
import sys
from pathlib import Path

import pytest
import torch

from tests._mp import PYTHON, REPO, free_port, run
from tests.conftest import TINY

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(400)]
TRAIN = str(REPO / "gan_dist" / "train.py")
BIN = Path(PYTHON).parent


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def only_run_dir(cwd: Path) -> Path:
    runs = list((cwd / "runs").iterdir())
    assert len(runs) == 1, f"expected one run directory, found {runs}"
    return runs[0]


def check_run(run_dir: Path, world_size: int, launcher: str) -> dict:
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["status"] == "finished"
    assert info["world_size"] == world_size
    assert info["strategy"] == ("ddp" if world_size > 1 else "none")
    assert info["launcher"] == launcher
    assert info["steps"] == 4 and info["images_seen"] == 4 * 8 * world_size
    state = torch.load(run_dir / "generator.pt", weights_only=True)
    assert any(k.endswith("weight") for k in state)
    assert (run_dir / "samples.png").is_file() and (run_dir / "config.yaml").is_file()
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    return info


def test_no_module_of_the_package_shadows_another_when_train_py_runs_as_a_file():
    """Run as a file, train.py puts gan_dist/ first on sys.path: a module there named like one of
    the standard library or of an installed package (gan_dist/logging.py once) would be imported
    in its place, by torch as much as by gan_dist."""
    package_dir = REPO / "gan_dist"
    ours = {m.name for m in pkgutil.iter_modules([str(package_dir)])}
    elsewhere = {m.name for m in pkgutil.iter_modules()
                 if Path(getattr(m.module_finder, "path", "")).resolve() != package_dir.resolve()}
    assert "runlog" in ours  # the package directory was read
    assert ours & (elsewhere | set(sys.stdlib_module_names)) == set()


def test_print_config_run_as_a_file(tmp_path):
    out = run([PYTHON, TRAIN, "--print-config", "train.steps=3"], cwd=tmp_path, timeout=120).stdout
    assert "steps: 3" in out


def test_single_process_python(tmp_path):
    run([PYTHON, TRAIN, *TINY], cwd=tmp_path, timeout=240)
    check_run(only_run_dir(tmp_path), 1, "python")


def test_accelerate_launch_multi_gpu_two_processes_is_one_job(tmp_path):
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(free_port()), TRAIN, *TINY]
    run(cmd, cwd=tmp_path, timeout=300)
    check_run(only_run_dir(tmp_path), 2, "accelerate")


def test_torchrun_two_processes_is_one_job(tmp_path):
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), TRAIN, *TINY]
    run(cmd, cwd=tmp_path, timeout=300)
    check_run(only_run_dir(tmp_path), 2, "torchrun")


@pytest.mark.parametrize("nproc", [1, 2])
def test_same_command_and_seed_give_identical_generator(tmp_path, nproc):
    """bf16 and several loader workers included: the defaults must be reproducible too."""
    digests = []
    for attempt in ("a", "b"):
        args = [*TINY, "train.precision=bf16", "data.num_workers=2", "model.dcgan.norm=batch",
                f"run.dir={tmp_path / attempt}", "run.seed=5"]
        if nproc == 1:
            run([PYTHON, TRAIN, *args], cwd=tmp_path, timeout=240)
        else:
            run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                 "--master_port", str(free_port()), TRAIN, *args], cwd=tmp_path, timeout=300)
        digests.append(sha(tmp_path / attempt / "generator.pt"))
    assert digests[0] == digests[1]
    other = tmp_path / "other-seed"
    run([PYTHON, TRAIN, *TINY, f"run.dir={other}", "run.seed=6"], cwd=tmp_path, timeout=240)
    assert sha(other / "generator.pt") != digests[0]
