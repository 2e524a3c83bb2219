"""data.urls that name something other than shards: each case says what is there and what to do."""
from __future__ import annotations

import json
import re
import shlex
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gan_dist.data import DataError, resolve_shards
from tests._mp import PYTHON, REPO, run
from tests.workers.data_shards import data_cfg, make_shards

pytestmark = pytest.mark.timeout(300)
QUIET = lambda m: None  # noqa: E731


def resolve(urls):
    return resolve_shards(data_cfg(urls), need_counts=True, log=QUIET)


def test_a_folder_of_images_prints_the_command_that_makes_shards_of_it(tmp_path):
    src = tmp_path / "my photos"  # a space: the printed command must quote it
    for cls in ("cats", "dogs"):
        (src / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((10, 10, 3), 40 * i, np.uint8)).save(src / cls / f"{i}.jpg")
    with pytest.raises(DataError, match=r"holds images \(such as '.*cats/0\.jpg'\), not shards") as err:
        resolve(str(src))
    command = re.search(r"^\s*(python -m gan_dist\.shards .*)$", str(err.value), re.M)
    assert command, str(err.value)
    argv = shlex.split(command.group(1))
    assert argv[:5] == ["python", "-m", "gan_dist.shards", "--src", str(src)] and argv[5] == "--out"
    # the printed command, run as printed, makes shards that data.urls then takes
    run([PYTHON, *argv[1:], "--no-progress", "--workers", "1"], cwd=REPO, timeout=120)
    shards = resolve(argv[6])
    assert shards.total == 6 and shards.channels == 3 and shards.resolution == 10
    assert f"data.urls={shlex.quote(argv[6])}" in str(err.value)


def test_an_empty_folder_and_a_folder_of_other_files_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"directory '.*empty' is empty \(no \.tar shards, no manifest\.json\)"):
        resolve(str(tmp_path / "empty"))
    (tmp_path / "notes").mkdir()
    for name in ("a.txt", "b.csv"):
        (tmp_path / "notes" / name).write_text("x")
    with pytest.raises(DataError, match=r"'.*notes' holds no \.tar shards, no manifest\.json and no images "
                                        r"\(it has: a\.txt, b\.csv\)"):
        resolve(str(tmp_path / "notes"))


def test_tar_files_that_are_not_shards_are_named_with_what_they_hold(tmp_path):
    folder = tmp_path / "archives"
    folder.mkdir()
    with tarfile.open(folder / "code.tar", "w") as tar:
        for name in ("setup.cfg", "README.md"):
            tar.add(REPO / name, arcname=f"project/{name}")
    (folder / "fake.tar").write_bytes(b"not a tar file at all " * 100)
    with pytest.raises(DataError) as err:
        resolve(str(folder))
    text = str(err.value)
    assert "no WebDataset shards in directory" in text
    assert re.search(r"code\.tar': its first sample 'project/setup' has \.cfg but no image \(\.npy, \.png", text), text
    assert re.search(r"fake\.tar': it is not a tar archive", text), text
    with pytest.raises(DataError, match=r"no WebDataset shards: '.*fake\.tar': it is not a tar archive"):
        resolve(str(folder / "fake.tar"))
    # one good shard among them is enough: damaged shards are the reader's to skip and count
    good, _ = make_shards(folder, [3], prefix="good")
    assert set(good) < set(resolve(str(folder)).urls)


def test_a_manifest_that_lists_missing_shards_names_them(tmp_path):
    urls, _ = make_shards(tmp_path, [2, 2])
    entries = [{"name": Path(u).name, "count": 2} for u in urls] + [
        {"name": f"lost-{i}.tar", "count": 2} for i in range(3)]
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": entries}))
    with pytest.raises(DataError, match=r"manifest '.*manifest\.json' lists 3 of its 5 shards that do not exist: "
                                        r"'.*lost-0\.tar' and 2 more \(the last '.*lost-2\.tar'\).*"
                                        r"python -m gan_dist\.shards --verify "):
        resolve(str(tmp_path))
