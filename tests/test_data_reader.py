"""The shard reader in one process: epoch semantics, determinism, exact resume, bad data, URLs."""
from __future__ import annotations

import gzip
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from gan_dist.data import DataError, build_loader, resolve_shards
from gan_dist.data.plan import batches_per_epoch, epoch_ranges, stream_ranges
from gan_dist.data.tario import TarError, iter_samples, open_shard
from tests.workers.data_shards import (RES, add, data_cfg, encode_png, image_for, make_shards, truncate,
                                       write_shard)

pytestmark = pytest.mark.timeout(300)
QUIET = lambda m: None  # noqa: E731
CPU = torch.device("cpu")


def make_loader(urls, mode="epoch", workers=0, batch=4, seed=0, channels=1, res=RES, rank=0, world=1,
                log=QUIET, **kw):
    cfg = data_cfg(urls, mode=mode, num_workers=workers, **kw)
    shards = resolve_shards(cfg, need_counts=mode == "epoch", log=log)
    return build_loader(shards, cfg, channels, res, batch, seed, rank, world, CPU, log=log)


def take(loader, n):
    return [loader.next_batch() for _ in range(n)]


def to_u8(images: torch.Tensor) -> np.ndarray:
    """Loader output in [-1, 1] back to uint8 (B, H, W, C)."""
    return ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


# ---- the split --------------------------------------------------------------------------------
@pytest.mark.parametrize("counts", [[5, 0, 17, 3, 0, 41, 1], [100], [3, 3], [0, 9, 0]])
@pytest.mark.parametrize("slots", [1, 3, 4, 7])
def test_epoch_ranges_give_every_sample_to_exactly_one_slot(counts, slots):
    total = sum(counts)
    for epoch in range(3):
        seen, empty_checked = Counter(), Counter()
        sizes = []
        for slot in range(slots):
            n = 0
            for r in epoch_ranges(counts, 7, epoch, slot, slots):
                if counts[r.shard] == 0:
                    empty_checked[r.shard] += 1
                seen.update((r.shard, i) for i in range(r.start, r.stop))
                n += r.stop - r.start
                assert r.to_end == (r.stop == counts[r.shard])
            sizes.append(n)
        assert set(seen) == {(s, i) for s, c in enumerate(counts) for i in range(c)}
        assert max(seen.values()) == 1
        assert sorted(set(sizes)) in ([total // slots], sorted({total // slots, total // slots + 1}))
        assert empty_checked == Counter({s: 1 for s, c in enumerate(counts) if c == 0})


def test_stream_ranges_are_disjoint_and_reshuffled():
    parts = [stream_ranges(10, 3, 0, s, 4) for s in range(4)]
    shards = [r.shard for p in parts for r in p]
    assert sorted(shards) == list(range(10))
    assert [r.shard for r in stream_ranges(10, 3, 1, 0, 4)] != [r.shard for r in parts[0]]
    few = [stream_ranges(2, 3, 0, s, 4) for s in range(4)]  # fewer shards than slots: stride over samples
    assert {(r.stride, r.offset) for s, p in enumerate(few) for r in p} == {(4, s) for s in range(4)}


# ---- epoch semantics --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    root = tmp_path_factory.mktemp("uneven")
    urls, keys = make_shards(root, [13, 1, 0, 22, 7])  # 43 samples, one empty shard
    return root, urls, keys


def check_images(batch, flip):
    mirrored = 0
    for img, key in zip(to_u8(batch.images), batch.keys):
        want = image_for(key)
        if flip and not np.array_equal(img, want):
            assert np.array_equal(img, want[:, ::-1]), key
            mirrored += 1
        else:
            assert np.array_equal(img, want), key
    return mirrored


def test_epoch_mode_pad_reads_every_sample_once_per_epoch(uneven):
    root, urls, keys = uneven
    loader = make_loader(str(root), workers=2, batch=4, flip=True)
    T = batches_per_epoch(43, 2, 4, "pad")
    assert T == 6
    mirrored = 0
    for epoch in range(2):
        batches = take(loader, 2 * T)
        real = [k for b in batches for k, p in zip(b.keys, b.padded.tolist()) if not p]
        pads = [k for b in batches for k, p in zip(b.keys, b.padded.tolist()) if p]
        assert sorted(real) == sorted(keys)  # all of them, none twice
        assert len(pads) == 2 * T * 4 - 43 == 5
        assert set(pads) <= set(keys)
        assert loader.epoch == epoch + 1
        mirrored += sum(check_images(b, flip=True) for b in batches)
    assert 0 < mirrored < 2 * 48
    st = loader.stats()
    assert st["padded"] == 10 and st["dropped"] == 0
    assert st["by_reason"] == {"empty": 2}  # the empty shard, once per epoch
    assert st["read"] == 2 * 43 + 2 and st["skipped"] == 2
    empty_url = urls[2]
    assert st["by_shard"][empty_url]["reasons"] == {"empty": 2}
    loader.close()


def test_epoch_mode_drop_never_repeats(uneven):
    root, urls, keys = uneven
    loader = make_loader(str(root), workers=2, batch=4, epoch_remainder="drop")
    T = batches_per_epoch(43, 2, 4, "drop")
    assert T == 5
    for _ in range(2):
        batches = take(loader, 2 * T)
        seen = [k for b in batches for k in b.keys]
        assert len(seen) == len(set(seen)) == 40
        assert set(seen) <= set(keys)
        assert not any(b.padded.any() for b in batches)
    assert loader.stats()["dropped"] == 2 * 3
    loader.close()


def test_fewer_shards_than_readers_still_split_exactly(tmp_path):
    urls, keys = make_shards(tmp_path, [30])
    loader = make_loader(urls, workers=3, batch=2)
    T = batches_per_epoch(30, 3, 2, "pad")
    seen = [k for b in take(loader, 3 * T) for k, p in zip(b.keys, b.padded.tolist()) if not p]
    assert sorted(seen) == sorted(keys)
    loader.close()


def test_too_few_samples_for_the_readers_is_a_clear_error(tmp_path):
    urls, _ = make_shards(tmp_path, [3])
    with pytest.raises(DataError, match="at least 4 samples"):
        make_loader(urls, world=2, rank=0, workers=2)
    with pytest.raises(DataError, match="epoch_remainder"):
        make_loader(urls, batch=4, epoch_remainder="drop")


# ---- determinism and position ------------------------------------------------------------------
def same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys == y.keys
        assert torch.equal(x.images, y.images)
        assert torch.equal(x.padded, y.padded)


def test_same_seed_same_stream_other_seed_other_stream(uneven):
    root, _, _ = uneven
    a = take(make_loader(str(root), workers=2, seed=3, flip=True), 14)
    b = take(make_loader(str(root), workers=2, seed=3, flip=True), 14)
    c = take(make_loader(str(root), workers=2, seed=4, flip=True), 14)
    same_batches(a, b)
    assert [x.keys for x in a] != [x.keys for x in c]


def test_batches_cross_processes_as_uint8_and_arrive_scaled(uneven):
    root, _, _ = uneven
    loader = make_loader(str(root), workers=1)
    batch = loader.next_batch()
    assert batch.images.dtype == torch.float32 and -1 <= batch.images.min() and batch.images.max() <= 1
    assert next(loader._it)["images"].dtype == torch.uint8  # what the worker sent
    loader.close()


@pytest.fixture(scope="module")
def with_bad(tmp_path_factory):
    root = tmp_path_factory.mktemp("withbad")
    bad = {"s01i002": "corrupt", "s03i000": "wrong_size", "s03i004": "no_image"}
    urls, keys = make_shards(root, [11, 6, 0, 9, 17], bad=bad)
    return root, urls, keys


@pytest.mark.parametrize("mode,remainder,workers", [("epoch", "pad", 2), ("epoch", "drop", 2),
                                                    ("stream", "pad", 2), ("epoch", "pad", 0)])
def test_resume_from_state_gives_the_batches_of_the_uninterrupted_run(with_bad, tmp_path, mode, remainder, workers):
    root, _, _ = with_bad
    kw = dict(mode=mode, workers=workers, batch=4, flip=True, epoch_remainder=remainder, max_skip_fraction=1.0)
    through = make_loader(str(root), **kw)
    first = take(through, 9)  # past an epoch boundary (5 or 6 batches per worker and epoch)
    state = through.state_dict()
    torch.save(state, tmp_path / "data.pt")  # as a checkpoint stores it
    rest = take(through, 11)

    resumed = make_loader(str(root), **kw)
    resumed.load_state_dict(torch.load(tmp_path / "data.pt", weights_only=True))
    assert resumed.state_dict()["batches"] == 9
    same_batches(take(resumed, 11), rest)
    a, b = through.stats(), resumed.stats()
    for key in ("batches", "epoch", "read", "skipped", "padded", "dropped", "by_reason", "by_shard"):
        assert a[key] == b[key], key
    assert a["skipped"] > 0 and first
    through.close()
    resumed.close()


def test_resume_with_a_changed_reader_restarts_the_epoch_and_says_so(with_bad):
    root, _, _ = with_bad
    old = make_loader(str(root), workers=2, batch=4, max_skip_fraction=1.0)
    take(old, 13)
    state = old.state_dict()
    old.close()
    messages = []
    new = make_loader(str(root), workers=1, batch=4, max_skip_fraction=1.0, log=messages.append)
    new.load_state_dict(state)
    assert any("workers 2 -> 1" in m and "start of epoch 1" in m for m in messages), messages
    assert new.epoch == 1
    new.close()


# ---- bad data -----------------------------------------------------------------------------------
@pytest.fixture()
def every_kind_of_bad(tmp_path):
    bad = {"s00i001": "corrupt", "s00i003": "wrong_size", "s00i005": "wrong_mode", "s00i007": "no_image"}
    urls, keys = make_shards(tmp_path, [10, 12, 0, 8], bad=bad)  # shard 2: a valid empty tar
    truncate(Path(urls[1]))
    (tmp_path / "part-000004.tar").write_bytes(b"")  # a zero-byte shard
    urls.append(str(tmp_path / "part-000004.tar"))
    return tmp_path, urls


@pytest.mark.parametrize("mode", ["epoch", "stream"])
def test_every_kind_of_bad_data_is_skipped_counted_and_training_goes_on(every_kind_of_bad, mode):
    root, urls = every_kind_of_bad
    messages = []
    loader = make_loader(str(root), mode=mode, workers=2, batch=3, log=messages.append)
    if mode == "epoch":  # the truncated shard was counted as far as it is readable, and said so
        assert any(urls[1] in m and "truncated" in m for m in messages), messages
    batches = take(loader, 16)
    assert all(b.images.shape == (3, 1, RES, RES) for b in batches)
    for b in batches:  # whatever came through is a good image
        for img, key in zip(to_u8(b.images), b.keys):
            assert np.array_equal(img, image_for(key))
    st = loader.stats()
    reasons = st["by_reason"]
    for kind in ("corrupt", "wrong_size", "wrong_mode", "no_image", "truncated"):
        assert reasons.get(kind, 0) >= 1, (kind, reasons)
    assert reasons["empty"] >= 2  # the empty tar and the zero-byte file
    assert st["by_shard"][urls[0]]["reasons"] == {k: v for k, v in reasons.items()
                                                   if k in ("corrupt", "wrong_size", "wrong_mode", "no_image")}
    assert set(st["by_shard"][urls[1]]["reasons"]) == {"truncated"}
    assert st["by_shard"][urls[2]]["reasons"] == {"empty": reasons["empty"] // 2}
    summary = loader.global_stats()
    assert summary["skipped"] == st["skipped"] and summary["read"] == st["read"]
    loader.check(summary)  # 0.01 not yet judged: fewer than 1000 samples read
    with pytest.raises(DataError) as err:
        loader.check(summary, final=True)
    assert urls[0] in str(err.value) and "data.max_skip_fraction=0.01" in str(err.value)
    assert str(err.value).index(urls[0]) < str(err.value).index(urls[2])  # worst shard first
    loader.max_skip_fraction = 0.5
    loader.check(summary, final=True)
    loader.close()


@pytest.mark.parametrize("mode", ["epoch", "stream"])
def test_a_reader_with_nothing_usable_stops_with_a_clear_error(tmp_path, mode):
    keys = [f"k{i}" for i in range(6)]
    write_shard(tmp_path / "all-bad.tar", keys, bad={k: "corrupt" for k in keys})
    loader = make_loader(str(tmp_path), mode=mode, workers=1, batch=2)
    with pytest.raises(DataError) as err:
        loader.next_batch()
    text = str(err.value)
    assert text.startswith("data: rank 0 reader 0 found no usable sample") and "all-bad.tar" in text
    assert "Traceback" not in text
    loader.close()


def test_a_shard_that_disappears_mid_run_is_counted_not_fatal(tmp_path):
    urls, _ = make_shards(tmp_path, [6, 6, 6])
    loader = make_loader(urls, mode="stream", batch=2)
    Path(urls[1]).unlink()
    take(loader, 12)
    assert loader.stats()["by_shard"][urls[1]]["reasons"] == {"unreadable": loader.stats()["by_reason"]["unreadable"]}


# ---- URLs and manifests ------------------------------------------------------------------------
def test_missing_url_is_a_clear_error_before_reading(tmp_path):
    urls, _ = make_shards(tmp_path, [2, 2])
    with pytest.raises(DataError, match=r"shard '.*part-000002\.tar' does not exist \(nor do 7 more, "
                                        r"the last '.*part-000009\.tar'\)"):
        resolve_shards(data_cfg(str(tmp_path / "part-{000000..000009}.tar")), need_counts=True, log=QUIET)
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError, match=r"directory '.*sub' is empty"):
        resolve_shards(data_cfg(str(tmp_path / "sub")), need_counts=False, log=QUIET)
    with pytest.raises(DataError, match="more than once"):
        resolve_shards(data_cfg([urls[0], urls[0]]), need_counts=False, log=QUIET)


def test_pipe_urls_are_refused_unless_allowed(tmp_path):
    urls, keys = make_shards(tmp_path, [5, 4])
    piped = [f"pipe:cat {u}" for u in urls]
    with pytest.raises(DataError, match="data.allow_pipe=true"):
        resolve_shards(data_cfg(piped), need_counts=False, log=QUIET)
    with pytest.raises(DataError, match="data.allow_pipe=true"):
        resolve_shards(data_cfg("https://example.com/x.tar"), need_counts=False, log=QUIET)
    loader = make_loader(piped, allow_pipe=True, batch=3)
    seen = [k for b in take(loader, 3) for k in b.keys]
    assert sorted(seen) == sorted(keys)
    failing = "pipe:cat /nonexistent/shard.tar"
    with pytest.raises(DataError, match="/nonexistent/shard.tar' cannot be (opened|read)"):  # before training
        make_loader(piped + [failing], allow_pipe=True, batch=3)
    loader = make_loader(piped + [failing], mode="stream", allow_pipe=True, batch=3)
    take(loader, 9)  # in stream mode (no counting up front): skipped and counted each time
    assert set(loader.stats()["by_shard"][failing]["reasons"]) == {"unreadable"}


def test_manifest_counts_are_used_and_checked(tmp_path):
    from gan_dist.data.writer import ShardSink, write_manifest

    sink = ShardSink(tmp_path, "m", max_count=4)
    for i in range(10):
        sink.write(f"k{i:03d}", {"png": encode_png(image_for(f"k{i:03d}", 3)), "cls": b"1"})
    write_manifest(tmp_path, sink.close(), resolution=RES, channels=3, format="png")
    logs = []
    shards = resolve_shards(data_cfg(str(tmp_path)), need_counts=True, log=logs.append)
    assert shards.counts == [4, 4, 2] and shards.resolution == RES and not logs
    # a brace pattern over the same files finds the manifest next to them
    shards = resolve_shards(data_cfg(str(tmp_path / "m-{000000..000002}.tar")), need_counts=True, log=logs.append)
    assert shards.counts == [4, 4, 2] and not logs
    with pytest.raises(DataError, match="model.resolution=16"):
        make_loader(str(tmp_path), channels=3, res=16)
    with pytest.raises(DataError, match="model.channels=1"):
        make_loader(str(tmp_path), channels=1)
    # a shard whose size no longer matches its manifest is recounted, with a warning
    write_shard(tmp_path / "m-000001.tar", [f"x{i}" for i in range(30)], channels=3)
    shards = resolve_shards(data_cfg(str(tmp_path)), need_counts=True, log=logs.append)
    assert shards.counts == [4, 30, 2] and any("recounted" in m for m in logs)


def test_wids_index_is_a_manifest(tmp_path):
    import json

    urls, keys = make_shards(tmp_path, [3, 5])
    index = {"shardlist": [{"url": Path(u).name, "nsamples": n} for u, n in zip(urls, (3, 5))]}
    (tmp_path / "index.json").write_text(json.dumps(index))
    shards = resolve_shards(data_cfg(str(tmp_path / "index.json")), need_counts=True, log=QUIET)
    assert shards.urls == urls and shards.counts == [3, 5]


# ---- tar reading --------------------------------------------------------------------------------
def test_tar_reader_groups_members_reads_ranges_and_handles_long_names_and_gzip(tmp_path):
    path = tmp_path / "a.tar"
    long_dir = "d" * 120
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(5):
            add(tar, f"{long_dir}/k{i}.png", b"P" * (i + 1))
            add(tar, f"{long_dir}/k{i}.CLS", b"%d" % i)
    with open_shard(str(path)) as f:
        got = list(iter_samples(f, want=lambda i: 1 <= i < 3))
    assert [g[0] for g in got] == list(range(5))
    assert [g[1] for g in got] == [f"{long_dir}/k{i}" for i in range(5)]
    assert got[1][2] == {"png": b"PP", "cls": b"1"} and got[0][2] == {"png": None, "cls": None}
    gz = tmp_path / "a.tar.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    with open_shard(str(gz)) as f:
        assert [g[2]["cls"] for g in iter_samples(f)] == [b"%d" % i for i in range(5)]


def test_tar_reader_rejects_a_corrupt_header_and_a_cut_archive(tmp_path):
    path = tmp_path / "a.tar"
    write_shard(path, ["a", "b", "c"])
    data = bytearray(path.read_bytes())
    data[1024 + 10] ^= 0xFF  # inside a later header's name
    corrupt = tmp_path / "c.tar"
    corrupt.write_bytes(bytes(data))
    with open_shard(str(corrupt)) as f, pytest.raises(TarError, match="checksum"):
        list(iter_samples(f))
    cut = tmp_path / "t.tar"
    cut.write_bytes(path.read_bytes()[:2048 + 512 + 10])  # a whole, then b.png cut short
    got = []
    with open_shard(str(cut)) as f, pytest.raises(TarError, match="truncated"):
        for item in iter_samples(f):
            got.append(item)
    assert [g[1] for g in got] == ["a"]  # whole samples before the damage still come through
    with open_shard(str(path)) as f:
        assert len(list(iter_samples(f))) == 3


def test_stream_mode_ranks_read_different_samples_with_one_seed(tmp_path):
    make_shards(tmp_path, [10] * 8)
    firsts = []
    for rank in (0, 1):
        loader = make_loader(str(tmp_path), mode="stream", rank=rank, world=2, workers=1, batch=4)
        firsts.append([k for b in take(loader, 8) for k in b.keys])  # 32 of each rank's 40 in epoch 0
    assert len(set(firsts[0])) == 32 and not set(firsts[0]) & set(firsts[1])
