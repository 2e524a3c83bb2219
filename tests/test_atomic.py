"""gan_dist.atomic: a file is replaced whole or not at all."""
from __future__ import annotations

import pytest
import torch

from gan_dist.atomic import TMP_PREFIX, atomic_write, save_torch_atomic, write_text_atomic


def test_a_reader_sees_the_old_file_until_the_new_one_is_complete(tmp_path):
    path = tmp_path / "run_info.json"
    write_text_atomic(path, "old")
    with atomic_write(path, "w") as f:
        f.write("new, half written")
        f.flush()
        assert path.read_text() == "old"
        (tmp,) = [p for p in tmp_path.iterdir() if p != path]  # next to the target: same filesystem
        assert tmp.name.startswith(TMP_PREFIX)
    assert path.read_text() == "new, half written"
    assert [p.name for p in tmp_path.iterdir()] == ["run_info.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "generator.pt"
    save_torch_atomic({"w": torch.ones(3)}, path)
    with pytest.raises(OSError, match="No space left"):
        with atomic_write(path) as f:
            f.write(b"partial")
            raise OSError(28, "No space left on device")
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["generator.pt"]
