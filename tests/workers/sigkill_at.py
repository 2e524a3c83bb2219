"""Run `python -m gan_dist.train ARGS...` in this process, and SIGKILL this process at a planned
moment. The hooks wrap gan_dist's functions from the outside: the training loop and the
checkpoint code carry no test-only branch.

    python tests/workers/sigkill_at.py ARGS...          (also as torchrun's training script)

GAN_DIST_TEST_KILL_STEPS="ATTEMPT:RANK:STEP,..."  in torchrun attempt ATTEMPT
    (TORCHELASTIC_RESTART_COUNT, 0 without torchrun), rank RANK dies as it starts STEP (1-based):
    steps 1..STEP-1 are done, and so is any checkpoint they wrote.
GAN_DIST_TEST_KILL_SAVE="STEP:POINT"  dies inside the save of checkpoint STEP, at POINT:
    half:N      halfway through writing the N-th file of gan_dist.checkpoint.save_file
    file:N      just after the N-th save_file returned (written and fsynced)
    manifest    the temporary directory complete with its manifest, not yet renamed
    renamed     the directory renamed to stepNNN, `latest` not yet replaced
    pointer     the new `latest` written beside the old one, not yet moved over it
    latest      `latest` moved, older checkpoints not yet pruned
    prune       halfway through deleting the oldest checkpoint
"""
from __future__ import annotations

import io
import os
import runpy
import shutil
import signal
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def die(why: str) -> None:
    print(f"sigkill_at: SIGKILL ({why})", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def plan_steps(value: str) -> None:
    from gan_dist.trainer import Trainer

    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    rank = int(os.environ.get("RANK", "0"))
    steps = {int(s) for a, r, s in (item.split(":") for item in value.split(",")) if int(a) == attempt
             and int(r) == rank}
    produce = Trainer.next_batches

    def next_batches(self):
        if self.step + 1 in steps:
            die(f"attempt {attempt} rank {rank} at the start of step {self.step + 1}")
        return produce(self)

    Trainer.next_batches = next_batches


def plan_save(value: str) -> None:
    from gan_dist import checkpoint as ck

    step, point = value.split(":", 1)
    kind, _, nth = point.partition(":")
    state = {"active": False, "files": 0}
    save, save_file, rename, replace, rmtree = ck.Checkpointer.save, ck.save_file, os.rename, os.replace, shutil.rmtree

    def hooked_save(self, s, *args, **kwargs):
        state["active"] = s == int(step)
        return save(self, s, *args, **kwargs)

    def hooked_save_file(obj, path):
        if state["active"] and kind == "half" and state["files"] + 1 == int(nth):
            buf = io.BytesIO()
            ck.torch.save(obj, buf)
            with open(path, "wb") as f:
                f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                f.flush()
                os.fsync(f.fileno())
            die(f"halfway through {Path(path).name}")
        save_file(obj, path)
        if state["active"]:
            state["files"] += 1
            if kind == "file" and state["files"] == int(nth):
                die(f"after {Path(path).name}")

    def hooked_rename(src, dst, *args, **kwargs):  # Path.rename too
        is_commit = state["active"] and ck.STEP_DIR.match(Path(dst).name) and Path(src).name.startswith(ck.TMP_PREFIX)
        if is_commit and kind == "manifest":
            die(f"{Path(src).name} complete with its manifest, not yet renamed")
        rename(src, dst, *args, **kwargs)
        if is_commit and kind == "renamed":
            die(f"renamed to {Path(dst).name}, `latest` not yet replaced")

    def hooked_replace(src, dst, *args, **kwargs):  # Path.replace too
        is_latest = state["active"] and Path(dst).name == ck.LATEST
        if is_latest and kind == "pointer":
            die(f"new `latest` written to {Path(src).name}, not yet moved")
        replace(src, dst, *args, **kwargs)
        if is_latest and kind == "latest":
            die("`latest` moved, older checkpoints not yet pruned")

    def hooked_rmtree(path, *args, **kwargs):
        if state["active"] and kind == "prune" and ck.STEP_DIR.match(Path(path).name):
            files = sorted(p for p in Path(path).rglob("*") if p.is_file())
            for p in files[: len(files) // 2]:
                p.unlink()
            die(f"halfway through deleting {Path(path).name}")
        return rmtree(path, *args, **kwargs)

    ck.Checkpointer.save = hooked_save
    ck.save_file = hooked_save_file
    os.rename, os.replace, shutil.rmtree = hooked_rename, hooked_replace, hooked_rmtree


if __name__ == "__main__":
    if os.environ.get("GAN_DIST_TEST_KILL_STEPS"):
        plan_steps(os.environ["GAN_DIST_TEST_KILL_STEPS"])
    if os.environ.get("GAN_DIST_TEST_KILL_SAVE"):
        plan_save(os.environ["GAN_DIST_TEST_KILL_SAVE"])
    sys.argv = ["gan_dist.train", *sys.argv[1:]]
    runpy.run_module("gan_dist.train", run_name="__main__", alter_sys=True)
