"""Files that are replaced whole or not at all: a reader (or a run resumed after a crash or a
full disk) sees the old file or the new one, never half of one.

The new content goes to a temporary file in the same directory (a rename is atomic only within
one filesystem), is flushed and fsynced, then `os.replace`s the old file; the directory is
fsynced so that the rename itself survives a power cut. Temporary names start with
`TMP_PREFIX`, so whoever owns a directory can sweep the remains of interrupted writes.
"""
from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

TMP_PREFIX = ".tmp-"


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file next to `path` for writing; on a clean exit it replaces `path`,
    on an exception it is removed and `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """`path` holds `text`, replaced atomically (see the module docstring)."""
    with atomic_write(path, "w") as f:
        f.write(text)


def save_torch_atomic(obj: Any, path: Path) -> None:
    """torch.save into `path`, replaced atomically."""
    import torch

    with atomic_write(path) as f:
        torch.save(obj, f)
