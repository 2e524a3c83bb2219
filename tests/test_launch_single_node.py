"""launch/single_node.sh and the accelerate config files start gan_dist the way their names say."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests._mp import PYTHON, REPO, base_env, free_port, run
from tests.conftest import TINY

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(400)]
BIN = Path(PYTHON).parent


def env_with_venv(**extra: str) -> dict:
    env = base_env(**extra)
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env["PYTHON"] = PYTHON
    return env


def run_info(run_dir: Path) -> dict:
    return json.loads((run_dir / "run_info.json").read_text())


def test_single_node_script_with_two_cpu_processes(tmp_path):
    run(["bash", str(REPO / "launch" / "single_node.sh"), *TINY, f"run.dir={tmp_path / 'r'}"],
        env=env_with_venv(NPROC="2"), cwd=tmp_path, timeout=300)
    info = run_info(tmp_path / "r")
    assert info["world_size"] == 2 and info["strategy"] == "ddp" and info["status"] == "finished"


def test_single_node_script_passes_bad_overrides_through_to_a_clear_error(tmp_path):
    res = run(["bash", str(REPO / "launch" / "single_node.sh"), "train.bogus=1"],
              env=env_with_venv(NPROC="1"), cwd=tmp_path, timeout=200, check=False)
    assert res.returncode != 0 and "train.bogus" in res.stderr


@pytest.mark.parametrize("config, nproc, strategy", [
    ("one_gpu.yaml", 1, "none"),
    ("single_node_ddp.yaml", 2, "ddp"),
    ("fsdp.yaml", 2, "fsdp"),
    ("deepspeed.yaml", 2, "deepspeed"),
])
def test_accelerate_config_files_start_the_named_job(tmp_path, config, nproc, strategy):
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(REPO / "configs" / "accelerate" / config),
           "--num_processes", str(nproc), "--main_process_port", str(free_port()),
           str(REPO / "gan_dist" / "train.py"), *TINY, f"run.dir={tmp_path / 'r'}"]
    run(cmd, env=env_with_venv(), cwd=tmp_path, timeout=300)
    info = run_info(tmp_path / "r")
    assert info["world_size"] == nproc and info["strategy"] == strategy and info["launcher"] == "accelerate"


def test_multi_node_config_two_launchers_form_one_job(tmp_path):
    """configs/accelerate/multi_node.yaml as two nodes on one machine: one launcher per machine rank."""
    import subprocess

    port = str(free_port())
    procs = []
    for rank in (0, 1):
        cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(REPO / "configs" / "accelerate" / "multi_node.yaml"),
               "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
               "--main_process_port", port, str(REPO / "gan_dist" / "train.py"), *TINY, f"run.dir={tmp_path / 'r'}"]
        procs.append(subprocess.Popen(cmd, env=env_with_venv(), cwd=tmp_path, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    info = run_info(tmp_path / "r")
    assert info["world_size"] == 2 and info["num_nodes"] == 2 and info["strategy"] == "ddp"
