"""The shared part of the demos' slow tests: check that the calibration is for the test's own
config and length, train it as calibrated (seed 0), and read the first and last evaluation."""
from __future__ import annotations

import json
from pathlib import Path

from tests._mp import PYTHON, REPO, run


def demo_overrides(steps: int) -> list[str]:
    """A demo's run shortened to `steps`, evaluated at the start and at the end only, with no
    sample grids or checkpoints in between (what the calibration records as `overrides`)."""
    return [f"train.steps={steps}", f"eval.every={steps}", "train.sample_every=100000", "train.ckpt_every=100000"]


def train_as_calibrated(run_dir: Path, config: str, overrides: list[str], calibration: Path, steps: int,
                        test_file: str, threads: int = 1) -> tuple[dict, dict, dict]:
    """(calibration, first evaluation, last evaluation) of the demo trained with `threads`
    threads, as calibrated: the same arithmetic as seed 0's calibration run."""
    cal = json.loads(calibration.read_text())
    assert (cal.get("config"), cal["overrides"]) == (config, overrides), \
        "the calibration is for another config or length: rerun scripts/calibrate_demo_fd.py --test " + test_file
    run([PYTHON, "-m", "gan_dist.train", "--config", config, *overrides, f"run.threads={threads}",
         f"run.dir={run_dir}"], timeout=1700, cwd=REPO)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, steps]
    return cal, rows[0], rows[-1]
