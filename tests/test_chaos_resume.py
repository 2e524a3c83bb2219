"""Repeated faults lose nothing.

Chaos: one `torchrun --max-restarts 3` run of 2 processes in which a random rank is SIGKILLed
three times at random steps (seeded) ends with a generator.pt bitwise equal to an uninterrupted
run's, in fp32 and bf16. Torn saves: a process SIGKILLed at any point of a checkpoint write
never leaves a checkpoint that resume would take but is broken, and rerunning the command
continues exactly. The kills come from tests/workers/sigkill_at.py, which wraps gan_dist's
functions from outside, so the training loop carries no test-only branch.
"""
from __future__ import annotations

import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from gan_dist.checkpoint import TMP_PREFIX, checkpoint_dirs, verify
from tests._ckpt import BIN, Ranks, kill_tree, latest, sha, step_of, train, train_cmd
from tests._mp import PYTHON, REPO, base_env, free_port, run

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(600)]
WORKER = str(REPO / "tests" / "workers" / "sigkill_at.py")
SEED = 13


def kill_plan(seed: str, total: int, every: int, kills: int = 3) -> list[tuple[int, int, int, int]]:
    """(attempt, rank, step it dies at, step it resumes from) for each kill: a random rank, at a
    random step after the attempt has written at least one checkpoint of its own."""
    rng = random.Random(seed)
    plan, resume = [], 0
    for attempt in range(kills):
        step = rng.randint(resume + every + 2, resume + 2 * every + 1)
        assert step < total, "the plan must leave the last attempt some steps"
        plan.append((attempt, rng.randrange(2), step, resume))
        resume = (step - 1) // every * every  # the last checkpoint the killed attempt wrote
    return plan


@pytest.mark.slow  # about 2 min per precision on 2 cores: four torchrun attempts and a reference run
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_three_sigkills_of_random_ranks_under_torchrun_lose_nothing(tmp_path, precision):
    total, every = 30, 4
    args = [f"train.steps={total}", f"train.ckpt_every={every}", f"train.precision={precision}"]
    plan = kill_plan(f"{SEED}-{precision}", total, every)

    t0 = time.monotonic()
    ranks = Ranks(train_cmd(tmp_path / "whole", *args), 2)
    assert ranks.wait(300) == [0, 0], ranks.logs()
    whole_s = time.monotonic() - t0

    run_dir = tmp_path / "chaos"
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--max-restarts", "3",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "chaos",
           WORKER, *train_cmd(run_dir, *args)[3:]]
    env = base_env(GAN_DIST_PG_TIMEOUT="60",
                   GAN_DIST_TEST_KILL_STEPS=",".join(f"{a}:{r}:{s}" for a, r, s, _ in plan))
    log_path = tmp_path / "torchrun.log"
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        launcher = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            code = launcher.wait(timeout=480)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            kill_tree(launcher.pid)
            launcher.wait(timeout=10)
    chaos_s = time.monotonic() - t0
    out = log_path.read_text()
    assert code == 0, f"torchrun exit {code}:\n{out[-6000:]}"

    for attempt, rank, step, resume in plan:
        assert f"attempt {attempt} rank {rank} at the start of step {step}" in out, out[-6000:]
    resumed = [resume for _, _, _, resume in plan[1:]] + [(plan[-1][2] - 1) // every * every]
    for resume in resumed:  # each restart resumed from the last checkpoint of the killed attempt
        assert resume == 0 or f"at step {resume}" in out, out[-6000:]
    assert sha(run_dir / "generator.pt") == sha(tmp_path / "whole" / "generator.pt")
    lost = [(step - 1) - resume for (_, _, step, _), resume in zip(plan, resumed)]
    print(f"\nchaos {precision}: kills (attempt, rank, step) {[(a, r, s) for a, r, s, _ in plan]}, "
          f"3 restarts, lost steps {lost} (sum {sum(lost)} of {total}), "
          f"{chaos_s:.1f} s vs {whole_s:.1f} s uninterrupted")


# ---- SIGKILL during a checkpoint write -------------------------------------------------------
TOTAL = 8
EVERY = ["train.ckpt_every=2", "train.keep_ckpts=2"]
# (point of the save of step 6, the checkpoint the rerun must resume from)
POINTS = [("half:1", 4), ("file:3", 4), ("manifest", 4), ("renamed", 6), ("pointer", 6), ("latest", 6),
          ("prune", 6)]


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory) -> dict[str, Path]:
    """A run stopped after 4 steps (checkpoints 2 and 4), and the sha of an uninterrupted run."""
    base = tmp_path_factory.mktemp("torn")
    train(base / "whole", f"train.steps={TOTAL}", *EVERY)
    train(base / "four", "train.steps=4", *EVERY)
    return {"run": base / "four", "sha": sha(base / "whole" / "generator.pt")}


@pytest.mark.slow  # 7 points x (a killed run + its rerun): about 3 min on 2 cores
@pytest.mark.parametrize("point, resumes_at", POINTS, ids=[p for p, _ in POINTS])
def test_sigkill_during_a_checkpoint_write_never_leaves_a_broken_checkpoint(tmp_path, four_steps, point,
                                                                           resumes_at):
    run_dir = tmp_path / "run"
    shutil.copytree(four_steps["run"], run_dir)
    r = run([PYTHON, WORKER, *train_cmd(run_dir, f"train.steps={TOTAL}", *EVERY)[3:]], timeout=240, check=False,
            env=base_env(GAN_DIST_TEST_KILL_SAVE=f"6:{point}"), cwd=REPO)
    assert r.returncode == -9 and "sigkill_at: SIGKILL" in r.stderr, r.stderr[-3000:]

    # whatever verifies is whole: every file the manifest lists loads
    ckpts = run_dir / "checkpoints"
    valid = [c for c in checkpoint_dirs(ckpts) if verify(c) is None]
    assert valid and step_of(valid[0]) == resumes_at, [c.name for c in checkpoint_dirs(ckpts)]
    for c in valid:
        for f in c.rglob("*.pt"):
            torch.load(f, weights_only=True, map_location="cpu")

    r = train(run_dir, f"train.steps={TOTAL}", *EVERY)
    assert f"at step {resumes_at}" in r.stderr, r.stderr[-3000:]
    assert sha(run_dir / "generator.pt") == four_steps["sha"]
    assert not list(ckpts.glob(f"{TMP_PREFIX}*")), sorted(p.name for p in ckpts.iterdir())
    assert step_of(latest(run_dir)) == TOTAL
