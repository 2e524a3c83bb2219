"""benchmarks/gpu_check.sh, checked on a CPU: its syntax, the commands of its dry run (each
throughput command parsed by throughput.py's own parser), and a tiny run of every command."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess

import pytest

from benchmarks.common import MODELS
from benchmarks.throughput import parse_args
from tests._mp import PYTHON, REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def gpu_check(*args: str, out: str, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=PYTHON, GPU_CHECK_OUT=out)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def steps(stdout: str) -> dict[str, list[str]]:
    """{step name: its command} from the script's '[gpu_check Ns] NAME: CMD' lines."""
    out = {}
    for line in stdout.splitlines():
        m = re.match(r"\[gpu_check \d+s\] ([^:]+): (.*)$", line)
        if m and not m.group(2).startswith("exit "):
            out[m.group(1)] = shlex.split(m.group(2))
    return out


def test_syntax():
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_dry_run_lists_every_part_with_valid_options(tmp_path):
    r = gpu_check("--dry-run", out=str(tmp_path / "res"), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    found = steps(r.stdout)
    assert found["tests"][:3] == [PYTHON, "-m", "pytest"] and "tests/test_cuda.py" in found["tests"]
    for model in MODELS:  # every model at one GPU
        cmd = found[f"throughput {model}"]
        assert cmd[:2] == [PYTHON, "benchmarks/throughput.py"]
        args = parse_args(cmd[2:])  # the options exist and their values are valid
        assert args.model == model and args.json.startswith(str(tmp_path / "res" / "gpu_cpu_throughput_"))
    compiled = parse_args(found["throughput dcgan-64 compiled"][2:])
    assert compiled.compile is True
    assert "benchmarks/seed_loop.py" in found["seed loop dcgan-64"]
    assert not (tmp_path / "res").exists()  # a dry run writes nothing


def test_full_mode_refuses_a_machine_without_gpu(tmp_path):
    if subprocess.run(["sh", "-c", "nvidia-smi -L"], capture_output=True).returncode == 0:
        pytest.skip("this machine has a GPU")
    r = gpu_check(out=str(tmp_path), timeout=120)
    assert r.returncode == 2 and "no GPU" in r.stderr


@pytest.mark.slow  # a few minutes on 2 busy cores
@pytest.mark.timeout(900)
def test_smoke_mode_runs_every_command_and_writes_the_results(tmp_path):
    r = gpu_check("--smoke", out=str(tmp_path), timeout=850)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["gpu_cpu_seed_loop_dcgan32.json", "gpu_cpu_seed_loop_dcgan32.md", "gpu_cpu_tests.md",
                     "gpu_cpu_throughput_dcgan32.json", "gpu_cpu_throughput_dcgan32.md"], names
    for name in names:
        if name.endswith(".json"):
            assert json.loads((tmp_path / name).read_text())
    assert "tests/test_cuda.py" in (tmp_path / "gpu_cpu_tests.md").read_text()
