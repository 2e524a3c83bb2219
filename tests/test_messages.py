"""gan_dist.messages: what a command tells its user, one line each on stderr."""
from __future__ import annotations

import sys

from tqdm import tqdm

from gan_dist.messages import error, note, warn


def test_one_line_each_on_stderr_after_the_program_name(capsys):
    note("resumed from runs/x at step 4")
    warn("train.resume is ignored")
    error("--ckpt 'x' does not exist", prog="gan_dist.generate")
    error("train.loss: unknown", kind="config error")
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == ["gan_dist: resumed from runs/x at step 4", "gan_dist: warning: train.resume is ignored",
                                "gan_dist.generate: error: --ckpt 'x' does not exist",
                                "gan_dist: config error: train.loss: unknown"]


def test_a_message_during_a_progress_bar_gets_a_line_of_its_own(capsys):
    bar = tqdm(total=4, desc="train", file=sys.stderr, mininterval=0, disable=False)
    bar.update(2)
    note("checkpoint written")
    bar.close()
    err = capsys.readouterr().err
    (line,) = [seg for seg in err.split("\n") if "checkpoint written" in seg]
    assert line.split("\r")[-1] == "gan_dist: checkpoint written"  # not appended to the bar's text
