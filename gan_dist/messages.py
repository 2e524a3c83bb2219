"""Messages for the person running a command: one line each on stderr, after the program's name
(`gan_dist: warning: ...`), so that they stand apart from results on stdout and from library
output. A progress bar on the terminal is redrawn below the message instead of being cut.
"""
from __future__ import annotations

import sys

PROG = "gan_dist"


def _write(line: str) -> None:
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)
    sys.stderr.flush()


def note(message: str, prog: str = PROG) -> None:
    """Something the user should know that needs no action."""
    _write(f"{prog}: {message}")


def warn(message: str, prog: str = PROG) -> None:
    """Something that may not be what the user wanted; the command goes on."""
    _write(f"{prog}: warning: {message}")


def error(message: str, prog: str = PROG, kind: str = "error") -> None:
    """Why the command stops (`kind`: "config error", "checkpoint error", ...)."""
    _write(f"{prog}: {kind}: {message}")
