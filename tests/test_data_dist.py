"""The reader across real processes (gloo): exact epochs over uneven shards, stream mode, training."""
from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from tests._mp import PYTHON, REPO, base_env, free_port, run, run_ranks
from tests.workers.data_shards import make_shards

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(300)]
WORKER = str(REPO / "tests" / "workers" / "data_ranks.py")
PER_RANK = str(REPO / "tests" / "workers" / "per_rank.py")
TRAIN = str(REPO / "gan_dist" / "train.py")
TINY = ["model.dcgan.ngf=8", "model.dcgan.ndf=8", "model.dcgan.nz=16", "train.batch_size=8", "train.precision=fp32",
        "run.threads=1", "train.log_every=2", "data.shuffle_buffer=16"]


def ranks(tmp_path, name, urls, world_size=2, **opts) -> list[dict]:
    argv = [PER_RANK, WORKER, "--urls", str(urls), "--out", str(tmp_path / f"{name}-{{rank}}.json")]
    for k, v in opts.items():
        argv += [f"--{k}", str(v)]
    run_ranks(argv, world_size, timeout=240)
    return [json.loads((tmp_path / f"{name}-{r}.json").read_text()) for r in range(world_size)]


def test_epoch_mode_two_ranks_two_workers_uneven_shards(tmp_path):
    sizes = [37, 5, 0, 61, 13, 29, 2]  # 147 samples, one empty shard
    _, keys = make_shards(tmp_path / "d", sizes)
    # 4 readers x 5 batches of 8 per epoch = 160 = 147 + 13 padded
    out = ranks(tmp_path, "ep", tmp_path / "d", batches=20, workers=2, batch=8)
    per_epoch = out[0]["batches_per_epoch"]
    assert per_epoch == out[1]["batches_per_epoch"] == 10  # both ranks: the same number of batches
    for epoch in range(2):
        real, pads = [], 0
        for r in out:
            for ks, ps in zip(r["keys"][epoch * per_epoch:(epoch + 1) * per_epoch],
                              r["padded"][epoch * per_epoch:(epoch + 1) * per_epoch]):
                real += [k for k, p in zip(ks, ps) if not p]
                pads += sum(ps)
        assert len(real) == len(set(real)) == len(keys)  # every sample once, none twice
        assert set(real) == set(keys)
        assert pads == 160 - 147
    assert out[0]["epoch"] == out[1]["epoch"] == 2
    s = out[0]["summary"]
    assert s == out[1]["summary"] | {"wait_fraction": s["wait_fraction"]}  # all ranks agree
    assert s["padded"] == 2 * 13 and s["dropped"] == 0
    assert s["read"] == 2 * 147 + 2 and s["skipped"] == 2 and s["by_reason"] == {"empty": 2}
    assert s["samples"] == 2 * 20 * 8
    assert out[0]["local"]["padded"] + out[1]["local"]["padded"] == s["padded"]


def test_epoch_mode_drop_two_ranks(tmp_path):
    _, keys = make_shards(tmp_path / "d", [37, 5, 61, 13, 29, 2])
    out = ranks(tmp_path, "drop", tmp_path / "d", batches=8, workers=2, batch=8, remainder="drop")
    seen = [k for r in out for ks in r["keys"] for k in ks]
    assert len(seen) == len(set(seen)) == 4 * 4 * 8  # 4 readers x floor(36 / 8) batches
    assert out[0]["summary"]["dropped"] == len(keys) - len(seen)


def test_stream_mode_ranks_differ_and_the_seed_fixes_the_stream(tmp_path):
    make_shards(tmp_path / "d", [10] * 8)  # 4 readers x 2 shards x 10 samples per epoch
    a = ranks(tmp_path, "a", tmp_path / "d", mode="stream", batches=4, workers=2, seed=5)
    b = ranks(tmp_path, "b", tmp_path / "d", mode="stream", batches=4, workers=2, seed=5)
    c = ranks(tmp_path, "c", tmp_path / "d", mode="stream", batches=4, workers=2, seed=6)
    first = [[k for ks in r["keys"] for k in ks] for r in a]
    assert not set(first[0]) & set(first[1])  # within an epoch the ranks read disjoint shards
    assert [r["keys"] for r in a] == [r["keys"] for r in b]
    assert [r["keys"] for r in a] != [r["keys"] for r in c]


@pytest.fixture(scope="module")
def bad32(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad32")
    bad = {"s01i003": "corrupt", "s02i007": "no_image"}
    urls, keys = make_shards(root / "d", [16, 16, 16, 16], bad=bad, resolution=32)
    return root / "d", urls


def test_training_counts_bad_data_across_ranks(tmp_path, bad32):
    data, urls = bad32
    run_dir = tmp_path / "run"
    # 2 ranks x 1 worker x 4 batches of 8 = the 64 samples once
    run_ranks([TRAIN, *TINY, "train.steps=4", "data.num_workers=1", f"data.urls={data}",
               "data.max_skip_fraction=0.5", f"run.dir={run_dir}"], 2, timeout=240)
    info = json.loads((run_dir / "run_info.json").read_text())
    d = info["data"]
    assert info["status"] == "finished" and info["world_size"] == 2
    assert d["read"] == 64 and d["skipped"] == 2 and d["padded"] == 2
    assert d["by_reason"] == {"corrupt": 1, "no_image": 1}
    assert {s["url"] for s in d["worst_shards"]} == {urls[1], urls[2]}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    assert events.Scalars("data/skipped")[-1].value == 2
    assert events.Scalars("data/skip_fraction")[-1].value == pytest.approx(2 / 64)


def test_too_much_bad_data_stops_training_naming_the_shards(tmp_path, bad32):
    data, urls = bad32
    res = run([PYTHON, TRAIN, *TINY, "train.steps=8", "data.num_workers=1", f"data.urls={data}",
               f"run.dir={tmp_path / 'run'}"], timeout=240, check=False, env=base_env())
    assert res.returncode == 2, res.stderr[-3000:]
    assert "data.max_skip_fraction=0.01" in res.stderr and urls[1] in res.stderr and urls[2] in res.stderr
    assert "Traceback" not in res.stderr
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["status"] == "failed: bad data" and info["data"]["skipped"] == 2


def test_missing_shard_stops_every_rank_before_training(tmp_path, bad32):
    data, urls = bad32
    port = free_port()
    argv = [PYTHON, TRAIN, *TINY, "train.steps=2", f"data.urls={data}/part-{{000000..000005}}.tar",
            f"run.dir={tmp_path / 'run'}"]
    procs = []
    for r in range(2):
        env = base_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))
    try:
        results = [p.communicate(timeout=120) for p in procs]  # rank 1 must not wait for rank 0
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 2, err[-3000:]
        assert "part-000004.tar' does not exist (nor do 1 more" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()
