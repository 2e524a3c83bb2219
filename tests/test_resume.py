"""Exact resume: a run that is stopped (by train.steps, a signal, or a killed rank) and resumed
gives a generator.pt bitwise identical to the run that was never interrupted."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from gan_dist.checkpoint import verify
from gan_dist.faults import EXIT_RETRY
from tests._ckpt import (BIN, TRAIN, Ranks, assert_tensors_equal, children, kill_tree, latest, sha, step_of,
                         train, train_cmd)
from tests._mp import REPO, base_env, free_port

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(600)]
TOTAL = 60  # steps of every run here
EVERY = ["train.ckpt_every=5"]


def run_info(run_dir: Path) -> dict:
    return json.loads((run_dir / "run_info.json").read_text())


def same_generator(a: Path, b: Path) -> None:
    """Equal tensors (the bytes of two torch.save files also depend on the file's name)."""
    assert_tensors_equal(torch.load(a, weights_only=True), torch.load(b, weights_only=True), a.name)


def ddp_run(run_dir: Path, *extra: str, timeout: float = 300) -> Ranks:
    ranks = Ranks(train_cmd(run_dir, *extra), 2)
    codes = ranks.wait(timeout)
    assert codes == [0, 0], f"exit codes {codes}\n{ranks.logs()}"
    return ranks


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[int, str]:
    """sha256 of generator.pt after TOTAL uninterrupted steps, in 1 and in 2 processes."""
    base = tmp_path_factory.mktemp("uninterrupted")
    train(base / "one", f"train.steps={TOTAL}", *EVERY)
    ddp_run(base / "two", f"train.steps={TOTAL}", *EVERY)
    out = {1: sha(base / "one" / "generator.pt"), 2: sha(base / "two" / "generator.pt")}
    assert out[1] != out[2]  # different global batches: the comparisons below are not vacuous
    return out


def test_more_steps_continue_the_run_exactly_one_process(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    train(run_dir, "train.steps=23", *EVERY)
    assert step_of(latest(run_dir)) == 23  # the end of a run is checkpointed too
    assert sha(run_dir / "generator.pt") != uninterrupted[1]
    r = train(run_dir, f"train.steps={TOTAL}", *EVERY)
    assert "resumed from" in r.stderr and "at step 23" in r.stderr
    assert run_info(run_dir)["steps"] == TOTAL
    assert sha(run_dir / "generator.pt") == uninterrupted[1]
    same_generator(latest(run_dir) / "generator.pt", run_dir / "generator.pt")  # every checkpoint exports G


def test_sigterm_saves_exits_with_the_retry_code_and_resumes_exactly(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    ranks = Ranks(train_cmd(run_dir, f"train.steps={TOTAL}", *EVERY), 1)
    ranks.wait_until(lambda: latest(run_dir) is not None, 120, "the first checkpoint")
    ranks.signal(0, signal.SIGTERM)
    assert ranks.wait(120) == [EXIT_RETRY], ranks.logs()
    stopped = latest(run_dir)
    assert 5 <= step_of(stopped) < TOTAL and verify(stopped) is None
    assert "received SIGTERM" in ranks.stderr(0) and f"step {step_of(stopped)}" in ranks.stderr(0)
    assert run_info(run_dir)["status"] == "interrupted" and not (run_dir / "generator.pt").exists()
    r = train(run_dir, f"train.steps={TOTAL}", *EVERY)
    assert f"at step {step_of(stopped)}" in r.stderr
    assert sha(run_dir / "generator.pt") == uninterrupted[1]


def test_sigusr1_to_one_rank_stops_both_and_two_processes_resume_exactly(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    ranks = Ranks(train_cmd(run_dir, f"train.steps={TOTAL}", *EVERY), 2)
    ranks.wait_until(lambda: latest(run_dir) is not None, 180, "the first checkpoint")
    ranks.signal(1, signal.SIGUSR1)  # only rank 1 hears it: the ranks must agree to stop
    assert ranks.wait(180) == [EXIT_RETRY, EXIT_RETRY], ranks.logs()
    stopped = latest(run_dir)
    assert 5 <= step_of(stopped) < TOTAL and verify(stopped) is None
    assert {"rank00000.pt", "rank00001.pt", "models.pt"} <= {p.name for p in stopped.iterdir()}
    assert "received SIGUSR1" in ranks.stderr(0)
    resumed = ddp_run(run_dir, f"train.steps={TOTAL}", *EVERY)
    assert f"at step {step_of(stopped)}" in resumed.stderr(0)
    assert sha(run_dir / "generator.pt") == uninterrupted[2]


def worker_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of the worker with RANK=`rank` among the launcher's children."""
    for pid in children(launcher_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    return None


def test_kill_9_of_a_rank_under_torchrun_restarts_and_resumes_exactly(tmp_path, uninterrupted):
    """torchrun keeps its store across restarts: the restarted workers must not read the gloo
    addresses of the killed attempt (gan_dist.distributed.attempt_store). Every wait has a
    deadline, and whatever torchrun started is killed at the end."""
    run_dir = tmp_path / "run"
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--max-restarts", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "ckpt-test",
           *TRAIN, *train_cmd(run_dir, f"train.steps={TOTAL}", *EVERY)[3:]]
    log = open(tmp_path / "torchrun.log", "w+")
    tail = lambda n: Path(log.name).read_text()[-n:]  # noqa: E731
    launcher = subprocess.Popen(cmd, cwd=REPO, env=base_env(GAN_DIST_PG_TIMEOUT="60"), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while latest(run_dir) is None:
            assert launcher.poll() is None, f"torchrun exited early:\n{tail(4000)}"
            assert time.monotonic() < deadline, f"no checkpoint appeared within 180s:\n{tail(4000)}"
            time.sleep(0.02)
        victim = worker_pid(launcher.pid, 1)
        assert victim is not None, "rank 1 not found among torchrun's children"
        os.kill(victim, signal.SIGKILL)
        killed_after = step_of(latest(run_dir))
        try:
            code = launcher.wait(timeout=300)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"torchrun did not finish within 300s of the kill:\n{tail(6000)}") from None
        assert code == 0, tail(6000)
    finally:
        kill_tree(launcher.pid)
        try:
            launcher.wait(timeout=10)
        finally:
            log.close()
    out = Path(log.name).read_text()
    info = run_info(run_dir)
    assert info["status"] == "finished" and info["steps"] == TOTAL and info["launcher"] == "torchrun"
    resumed_at = step_of(Path(info["resumed_from"]))
    assert killed_after <= resumed_at < TOTAL, (killed_after, resumed_at)
    assert f"at step {resumed_at}" in out
    assert sha(run_dir / "generator.pt") == uninterrupted[2]


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_sharded_strategies_resume_exactly(tmp_path, strategy):
    """Sharded checkpoints (DCP shards / DeepSpeed engine files) inside the same atomic,
    verified checkpoint directory: 12 steps, then 8 more, equal 20 uninterrupted steps."""
    args = [f"parallel.strategy={strategy}", *EVERY]
    ddp_run(tmp_path / "whole", "train.steps=20", *args)
    ddp_run(tmp_path / "split", "train.steps=12", *args)
    first = latest(tmp_path / "split")
    assert step_of(first) == 12 and verify(first) is None
    files = json.loads((first / "manifest.json").read_text())["files"]
    assert any("/" in name for name in files)  # the strategy's own sharded files are verified too
    resumed = ddp_run(tmp_path / "split", "train.steps=20", *args)
    assert "at step 12" in resumed.stderr(0)
    assert sha(tmp_path / "split" / "generator.pt") == sha(tmp_path / "whole" / "generator.pt")
    # the checkpoint's full generator.pt, gathered from the shards, is the run's generator
    same_generator(latest(tmp_path / "split") / "generator.pt", tmp_path / "whole" / "generator.pt")
