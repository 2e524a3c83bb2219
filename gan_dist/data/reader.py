"""The distributed, resumable shard reader behind `data.urls`.

Each rank runs a torch DataLoader whose workers are "reader slots" (see plan.py for who
reads what). A slot reads its tar sample ranges, shuffles the undecoded samples in a buffer,
decodes them to uint8 images (optionally mirrored), and hands over whole batches together
with its position and its counts of bad data. The batches cross to the training process as
uint8 and become float tensors in [-1, 1] on the device: a quarter of the bytes through
shared and pinned memory and over PCIe. (Scaling in the workers and sending floats was
30-40% slower end to end for raw shards on a 2-core CPU, benchmarks/data_throughput.py.)

The stream never ends: the trainer takes a fixed number of batches, so ranks never wait for
each other's data. Everything a slot does is a function of (run.seed, epoch, rank, worker,
position), so the same seed gives the same batches, and a position (epoch, samples taken
from the shuffle, batches emitted) is all it takes to continue exactly where a run stopped:
the slot re-reads its shuffle up to that point without decoding anything.

The DataLoader asks its workers for batches in turn; the loader checks that order and
rotates which worker plays which slot on resume, so batch k always comes from slot k mod W.
"""
from __future__ import annotations

import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gan_dist.data.decode import BadSample, decode_label, decode_sample, preload
from gan_dist.data.index import DataError, ShardSet
from gan_dist.data.plan import (Range, batches_per_epoch, epoch_ranges, flip_bit, shuffle_seed,
                                stream_ranges)
from gan_dist.data.stats import DataStats, Tally, check_skip_fraction, global_summary
from gan_dist.data.tario import TarError, iter_samples, open_shard, shard_size

STATE_VERSION = 1
# A stream-mode slot that finds nothing usable in this many of its epochs in a row gives up.
MAX_EMPTY_EPOCHS = 2


@dataclass(frozen=True)
class ReaderSpec:
    """Everything a reader slot needs; the same on every rank except `rank`."""

    urls: tuple[str, ...]
    counts: Optional[tuple[int, ...]]
    mode: str  # epoch | stream
    remainder: str  # pad | drop
    seed: int
    rank: int
    world_size: int
    workers: int  # slots per rank (DataLoader workers, at least 1)
    batch_size: int
    channels: int
    resolution: int
    shuffle_buffer: int
    flip: bool
    num_classes: int = 0  # > 0: each sample's `.cls` label travels with it (a conditional model)

    @property
    def slots(self) -> int:
        return self.world_size * self.workers

    @property
    def batches_per_epoch(self) -> int:
        """T: batches per slot per epoch (epoch mode)."""
        assert self.counts is not None
        return batches_per_epoch(sum(self.counts), self.slots, self.batch_size, self.remainder)


@dataclass
class Batch:
    images: torch.Tensor  # (B, C, R, R) float in [-1, 1] on the device
    keys: list[str]
    padded: torch.Tensor  # (B,) bool: a repeat that fills an epoch's last batch
    labels: Optional[torch.Tensor] = None  # (B,) int64 class indices on the device (conditional models)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1] (the same arithmetic on every device)."""
    return images.float().div_(127.5).sub_(1.0)


def _worker_message(text: str) -> str:
    """The original message of an exception that a DataLoader worker re-raised in this process."""
    if "Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    return last.split("DataError: ", 1)[-1]


class SlotReader:
    """The endless batches of one slot; runs inside a loader worker."""

    def __init__(self, spec: ReaderSpec, worker: int) -> None:
        self.spec = spec
        self.worker = worker
        self.slot = spec.rank * spec.workers + worker
        self.tally = Tally()

    # ---- reading ----------------------------------------------------------------------------
    def _read(self, ranges: Sequence[Range], count: bool) -> Iterator[tuple[int, str, dict]]:
        """(shard, key, members) of the ranges in order; lost samples counted when `count`."""
        tally = self.tally
        for rg in ranges:
            url = self.spec.urls[rg.shard]
            got, problem = 0, None
            expected = rg.length

            def want(i: int, rg: Range = rg) -> bool:
                return i >= rg.start and (rg.stop is None or i < rg.stop) and (i - rg.start) % rg.stride == rg.offset

            try:
                stream = open_shard(url)
            except OSError:
                if count:
                    tally.skip(rg.shard, "unreadable", expected if expected is not None else 1)
                continue
            extra, early, finished = 0, False, False
            try:
                for index, key, members in iter_samples(stream, want, shard_size(url, stream)):
                    if rg.stop is not None and index >= rg.stop:
                        if not rg.to_end:
                            early = True
                            break
                        extra += 1  # more samples than the count said: reported, not used
                        continue
                    if index < rg.start or (index - rg.start) % rg.stride != rg.offset:
                        continue
                    got += 1
                    yield rg.shard, key, members
                finished = True
            except (TarError, OSError, EOFError) as exc:
                problem = exc
            finally:
                try:
                    stream.close()
                except Exception as exc:  # noqa: BLE001 - e.g. the exit status of a pipe: command
                    if finished and not early and problem is None:  # read to the end, then it failed
                        problem = OSError(str(exc))
            if not count:
                continue
            if problem is not None:
                lost = max(1, (expected - got) if expected is not None else 1)
                unreadable = isinstance(problem, OSError) and got == 0  # e.g. a pipe command that failed
                tally.skip(rg.shard, "unreadable" if unreadable else "truncated", lost)
            elif expected is not None and got < expected:
                tally.skip(rg.shard, "truncated", expected - got)
            elif rg.to_end and rg.start == 0 and got == 0 and extra == 0 and rg.stride == 1:
                tally.skip(rg.shard, "empty")
            if extra:
                tally.skip(rg.shard, "uncounted", extra)

    def _shuffled(self, items: Iterator[tuple[int, str, dict]], seed: int) -> Iterator[tuple[int, str, dict]]:
        """A shuffle buffer over undecoded samples (deterministic for a given seed)."""
        rng = random.Random(seed)
        size = self.spec.shuffle_buffer
        buf: list[tuple[int, str, dict]] = []
        for item in items:
            if len(buf) < size:
                buf.append(item)
                continue
            j = rng.randrange(size)
            out, buf[j] = buf[j], item
            yield out
        rng.shuffle(buf)
        yield from buf

    def _decode(self, item: tuple[int, str, dict], epoch: int, pass_: int, pos: int,
                count: bool) -> Optional[tuple[np.ndarray, int]]:
        """(image, label) of a sample (label -1 for an unconditional model), None when it is bad."""
        shard, key, members = item
        label = -1
        try:
            img = decode_sample(members, self.spec.channels, self.spec.resolution)
            if self.spec.num_classes:
                label = decode_label(members)
        except BadSample as bad:
            if count:
                self.tally.skip(shard, bad.reason)
            return None
        if label >= self.spec.num_classes > 0:
            raise DataError(f"data: sample {key!r} of shard {self.spec.urls[shard]!r} has label {label}, but "
                            f"model.num_classes={self.spec.num_classes}: set model.num_classes={label + 1} "
                            "or more (or auto: from the data)")
        if count:
            self.tally.good(shard)
        if self.spec.flip and flip_bit(self.spec.seed, epoch, self.slot, pass_, pos):
            img = img[..., ::-1]
        return img, label

    def _batch(self, imgs: list[tuple[np.ndarray, int]], keys: list[str], pads: list[bool],
               state: tuple[int, int, int]) -> dict[str, Any]:
        return {"images": torch.from_numpy(np.stack([i for i, _ in imgs])), "keys": keys,
                "labels": torch.tensor([c for _, c in imgs], dtype=torch.long) if self.spec.num_classes else None,
                "padded": torch.tensor(pads, dtype=torch.bool),
                "worker": self.worker, "state": list(state), "tally": self.tally.take()}

    # ---- epoch mode -------------------------------------------------------------------------
    def _pass(self, epoch: int, ranges: list[Range], pass_: int) -> Iterator[tuple[int, str, dict]]:
        """One shuffled pass over the slot's samples; passes after the first fill up the epoch
        (padding) and are not counted as reads again."""
        return self._shuffled(self._read(ranges, count=pass_ == 0),
                              shuffle_seed(self.spec.seed, epoch, self.slot, pass_))

    def _epoch_batches(self, epoch: int, pos: int, emitted: int) -> Iterator[dict[str, Any]]:
        spec = self.spec
        assert spec.counts is not None
        target = spec.batches_per_epoch * spec.batch_size
        while True:
            ranges = epoch_ranges(spec.counts, spec.seed, epoch, self.slot, spec.slots)
            passes = _Passes(self, epoch, ranges)
            self.tally.enabled = False  # re-reading up to the saved position: counted before
            for _ in range(pos):
                passes.next()
            self.tally.enabled = True
            passes.watch()
            imgs: list[tuple[np.ndarray, int]] = []
            keys: list[str] = []
            pads: list[bool] = []
            while emitted < target:
                pass_, item = passes.next()
                pos += 1
                img = self._decode(item, epoch, pass_, pos - 1, count=pass_ == 0)
                if img is None:
                    continue
                passes.good += 1
                imgs.append(img)
                keys.append(item[1])
                pads.append(pass_ > 0)
                if pass_ > 0:
                    self.tally.padded += 1
                emitted += 1
                if len(imgs) == spec.batch_size:
                    if emitted == target:
                        if pass_ == 0:  # what is left of the slot's samples is dropped this epoch
                            self.tally.dropped += passes.rest_of_pass()
                        state = (epoch + 1, 0, 0)
                    else:
                        state = (epoch, pos, emitted)
                    yield self._batch(imgs, keys, pads, state)
                    imgs, keys, pads = [], [], []
            epoch, pos, emitted = epoch + 1, 0, 0

    # ---- stream mode ------------------------------------------------------------------------
    def _stream_batches(self, epoch: int, pos: int) -> Iterator[dict[str, Any]]:
        spec = self.spec
        imgs: list[tuple[np.ndarray, int]] = []
        keys: list[str] = []
        empty_epochs = 0
        while True:
            ranges = stream_ranges(len(spec.urls), spec.seed, epoch, self.slot, spec.slots)
            items = self._shuffled(self._read(ranges, count=True), shuffle_seed(spec.seed, epoch, self.slot, 0))
            self.tally.enabled = False
            for _ in range(pos):
                next(items, None)
            self.tally.enabled = True
            good = 0
            for item in items:
                pos += 1
                img = self._decode(item, epoch, 0, pos - 1, count=True)
                if img is None:
                    continue
                good += 1
                imgs.append(img)
                keys.append(item[1])
                if len(imgs) == spec.batch_size:
                    yield self._batch(imgs, keys, [False] * len(imgs), (epoch, pos, 0))
                    imgs, keys = [], []
            empty_epochs = 0 if good else empty_epochs + 1
            if empty_epochs >= MAX_EMPTY_EPOCHS:
                names = ", ".join(spec.urls[r.shard] for r in ranges[:3])
                raise DataError(f"data: rank {spec.rank} reader {self.worker} found no usable sample in "
                                f"{MAX_EMPTY_EPOCHS} passes over its shards ({names}...)")
            epoch, pos = epoch + 1, 0

    def batches(self, state: Sequence[int]) -> Iterator[dict[str, Any]]:
        epoch, pos, emitted = (int(x) for x in state)
        if self.spec.mode == "epoch":
            return self._epoch_batches(epoch, pos, emitted)
        return self._stream_batches(epoch, pos)


class _Passes:
    """A slot's epoch as a chain of passes (the first is the data, the rest padding), with the
    guard that stops a slot whose samples are all unusable from reading forever."""

    def __init__(self, reader: SlotReader, epoch: int, ranges: list[Range]) -> None:
        self.reader, self.epoch, self.ranges = reader, epoch, ranges
        self.pass_ = 0
        self.items = 0  # taken from the current pass
        self.good = 0  # decoded successfully in the current pass (counted by the caller)
        self.watched = False  # whether the caller decoded the whole current pass
        self.it = reader._pass(epoch, ranges, 0)

    def watch(self) -> None:
        """From here on the caller decodes every item; a pass seen whole is judged."""
        self.watched = self.items == 0

    def next(self) -> tuple[int, tuple[int, str, dict]]:
        while True:
            item = next(self.it, None)
            if item is not None:
                self.items += 1
                return self.pass_, item
            if (self.watched and self.good == 0) or (self.pass_ > 0 and self.items == 0):
                spec, r = self.reader.spec, self.reader
                names = ", ".join(spec.urls[g.shard] for g in self.ranges[:3])
                raise DataError(
                    f"data: rank {spec.rank} reader {r.worker} found no usable sample among its "
                    f"{sum(g.length or 0 for g in self.ranges)} samples of epoch {self.epoch} "
                    f"(shards {names}{'...' if len(self.ranges) > 3 else ''})")
            self.pass_ += 1
            self.items = self.good = 0
            self.watched = True
            self.it = self.reader._pass(self.epoch, self.ranges, self.pass_)

    def rest_of_pass(self) -> int:
        """Reads the rest of the current pass (for its counts) and says how many samples it had."""
        return sum(1 for _ in self.it)


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGTERM/SIGUSR1/SIGINT to the training process.

    SLURM (preemption, `scancel --signal`) and Ctrl-C signal every process of a job; a worker
    killed by them would make the training process fail before it can write its checkpoint.
    The workers still exit when the training process stops them or dies.
    """
    import signal

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


class _SlotDataset(IterableDataset):
    """What each DataLoader worker iterates: the slot it plays on this (re)start."""

    def __init__(self, spec: ReaderSpec, states: list[list[int]], rotate: int) -> None:
        super().__init__()
        self.spec, self.states, self.rotate = spec, states, rotate

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical, n = (info.id, info.num_workers) if info is not None else (0, 1)
        worker = (physical + self.rotate) % n
        return SlotReader(self.spec, worker).batches(self.states[worker])


class ShardLoader:
    """Endless batches of real images for one rank, with position and bad-data counts.

    `next(loader)` gives a (B, C, R, R) float tensor in [-1, 1] on the device;
    `next_batch()` also gives the sample keys and which samples are padding.
    """

    def __init__(self, shards: ShardSet, spec: ReaderSpec, device: torch.device, num_workers: int,
                 prefetch_factor: int = 2, max_skip_fraction: float = 0.01,
                 log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> None:
        self.shards, self.spec, self.device = shards, spec, device
        self.fingerprint = shards.fingerprint()
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.max_skip_fraction = max_skip_fraction
        self.log = log
        self.batches = 0  # taken by this rank
        self.worker_states: list[list[int]] = [[0, 0, 0] for _ in range(spec.workers)]
        self.stats_ = DataStats(len(spec.urls))
        self.wait_s = 0.0
        self._last_summary: tuple[float, float] = (time.perf_counter(), 0.0)
        self._loader: Optional[DataLoader] = None
        self._it: Optional[Iterator[dict[str, Any]]] = None

    # ---- iteration --------------------------------------------------------------------------
    def _start(self) -> None:
        workers = self.num_workers
        preload()
        ds = _SlotDataset(self.spec, [list(s) for s in self.worker_states], self.batches % self.spec.workers)
        self._loader = DataLoader(
            ds, batch_size=None, num_workers=workers, pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0, prefetch_factor=self.prefetch_factor if workers > 0 else None,
            # the loader's own seed draw must not advance the training RNG
            generator=torch.Generator().manual_seed(self.spec.seed),
            worker_init_fn=_ignore_stop_signals,
            multiprocessing_context="fork" if workers > 0 and os.name == "posix" else None)
        self._it = iter(self._loader)

    def next_batch(self) -> Batch:
        started = time.perf_counter()
        if self._it is None:
            self._start()
        assert self._it is not None
        try:
            raw = next(self._it)
        except DataError as exc:  # from a loader worker: drop the worker's traceback text
            raise DataError(_worker_message(str(exc))) from None
        worker = self.batches % self.spec.workers
        if raw["worker"] != worker:
            raise RuntimeError(f"data: batch {self.batches} came from reader {raw['worker']}, expected {worker}")
        self.worker_states[worker] = raw["state"]
        self.batches += 1
        self.stats_.add(raw["tally"])
        images = to_unit_range(raw["images"].to(self.device, non_blocking=True))
        labels = raw.get("labels")
        labels = labels.to(self.device, non_blocking=True) if labels is not None else None
        self.wait_s += time.perf_counter() - started
        return Batch(images, raw["keys"], raw["padded"], labels)

    def __next__(self) -> torch.Tensor:
        return self.next_batch().images

    def next_labelled(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(images, labels) of the next batch; labels None for an unconditional model."""
        batch = self.next_batch()
        return batch.images, batch.labels

    def __iter__(self) -> "ShardLoader":
        return self

    def close(self) -> None:
        """Stops the loader workers (they are started again by the next batch)."""
        it, self._it, self._loader = self._it, None, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()  # type: ignore[attr-defined]

    # ---- position -----------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        if self.spec.mode == "epoch":
            return self.batches // (self.spec.workers * self.spec.batches_per_epoch)
        return min(s[0] for s in self.worker_states)

    def state_dict(self) -> dict[str, Any]:
        """This rank's position and counts; a loader built the same way continues exactly from it."""
        s = self.spec
        return {"version": STATE_VERSION, "mode": s.mode, "remainder": s.remainder, "seed": s.seed,
                "rank": s.rank, "world_size": s.world_size, "workers": s.workers,
                "batch_size": s.batch_size, "fingerprint": self.fingerprint,
                "batches": self.batches, "samples": self.batches * s.batch_size, "epoch": self.epoch,
                "worker_states": [list(map(int, w)) for w in self.worker_states],
                "stats": self.stats_.state_dict()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Continue from a saved position: exactly when the data and the reader layout match,
        else (with a warning) from the start of the saved epoch."""
        if sd.get("version") != STATE_VERSION:
            raise DataError(f"data: cannot restore a reader position of version {sd.get('version')!r}")
        s = self.spec
        same_data = sd["fingerprint"] == self.fingerprint
        layout = {"mode": s.mode, "remainder": s.remainder, "seed": s.seed, "rank": s.rank,
                  "world_size": s.world_size, "workers": s.workers, "batch_size": s.batch_size}
        changed = [f"{k} {sd[k]!r} -> {v!r}" for k, v in layout.items() if sd.get(k) != v]
        if not same_data:
            changed.append("the shard list or its counts")
        self.close()
        self.stats_.load_state_dict(sd["stats"], same_shards=same_data)
        if not changed:
            self.batches = int(sd["batches"])
            self.worker_states = [list(map(int, w)) for w in sd["worker_states"]]
            return
        epoch = int(sd["epoch"])
        self.log(f"data: warning: the reader changed since the checkpoint ({'; '.join(changed)}); "
                 f"continuing from the start of epoch {epoch}, not from the exact sample")
        if s.mode == "epoch":
            self.batches = epoch * s.workers * s.batches_per_epoch
        else:
            self.batches = 0
        self.worker_states = [[epoch, 0, 0] for _ in range(s.workers)]

    # ---- counts -----------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """This rank's counts: batches and samples taken, samples read and skipped, by shard."""
        from gan_dist.data.stats import shard_report

        st = self.stats_
        read, skipped = int(st.read.sum()), int(st.skipped.sum())
        by_shard = {self.spec.urls[i]: {"read": int(st.read[i]), "skipped": int(st.skipped[i])}
                    for i in range(len(st.read)) if st.read[i] or st.skipped[i]}
        for entry in shard_report(self.spec.urls, st.read, st.skipped, st.reasons):
            by_shard[entry["url"]]["reasons"] = entry["reasons"]
        return {"batches": self.batches, "samples": self.batches * self.spec.batch_size, "epoch": self.epoch,
                "read": read, "skipped": skipped, "skip_fraction": skipped / read if read else 0.0,
                "padded": st.padded, "dropped": st.dropped,
                "by_reason": {r: n for r, n in st.reason_totals().items() if n},
                "by_shard": by_shard, "wait_s": self.wait_s}

    def global_stats(self) -> dict[str, Any]:
        """All ranks' counts added up, plus the share of time spent waiting for data since the
        last call. A collective: call it on every rank at the same step."""
        now = time.perf_counter()
        summary = global_summary(self.stats_, self.spec.urls, extra=[self.wait_s, 1.0])
        wait_total, ranks = summary.pop("extra")
        last_t, last_wait = self._last_summary
        summary["wait_fraction"] = max(0.0, (wait_total / ranks - last_wait) / max(now - last_t, 1e-9))
        self._last_summary = (now, wait_total / ranks)
        summary["epoch"] = self.epoch
        summary["samples"] = self.batches * self.spec.batch_size * int(ranks)
        return summary

    def check(self, summary: dict[str, Any], final: bool = False) -> None:
        """DataError (on every rank alike) when too much of what was read is bad."""
        check_skip_fraction(summary, self.max_skip_fraction, final)

    @staticmethod
    def scalars(summary: dict[str, Any]) -> dict[str, float]:
        """TensorBoard values of a global summary."""
        return {"data/skipped": summary["skipped"], "data/skip_fraction": summary["skip_fraction"],
                "data/padded": summary["padded"], "data/dropped": summary["dropped"],
                "data/epoch": summary["epoch"], "data/wait_fraction": summary["wait_fraction"]}


def check_compatible(shards: ShardSet, channels: int, resolution: int) -> None:
    """A manifest that says the shards cannot fit the model: stop before training."""
    where = os.path.dirname(shards.urls[0]) or shards.urls[0]
    if shards.resolution is not None and int(shards.resolution) != resolution:
        raise DataError(
            f"data: the shards in {where!r} are {shards.resolution} px (their manifest) but "
            f"model.resolution={resolution}; set model.resolution={shards.resolution} or rewrite them with "
            f"python -m gan_dist.shards --resolution {resolution}")
    if shards.channels is not None and int(shards.channels) == 3 and channels == 1:
        raise DataError(
            f"data: the shards in {where!r} are RGB (their manifest) but model.channels=1; set "
            "model.channels=3 or rewrite them with python -m gan_dist.shards --channels 1")


def build_loader(shards: ShardSet, data_cfg: Any, channels: int, resolution: int, batch_size: int,
                 seed: int, rank: int, world_size: int, device: torch.device,
                 log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
                 num_classes: int = 0) -> ShardLoader:
    """The loader of `data.*` for this rank; every rank raises the same DataError if it cannot work."""
    check_compatible(shards, channels, resolution)
    workers = max(1, data_cfg.num_workers)
    counts = tuple(shards.counts) if shards.counts is not None else None
    if data_cfg.mode == "epoch":
        if counts is None:
            raise DataError("data: epoch mode needs the sample count of every shard")
        slots = world_size * workers
        total = sum(counts)
        need = slots if data_cfg.epoch_remainder == "pad" else slots * batch_size
        if total < need:
            what = ("one sample per reader" if data_cfg.epoch_remainder == "pad"
                    else "a full batch per reader (data.epoch_remainder=drop)")
            raise DataError(
                f"data: epoch mode splits the {total} samples over {world_size} rank(s) x "
                f"{workers} loader worker(s) = {slots} readers and needs {what}, i.e. at least {need} samples; "
                "use fewer data.num_workers, data.epoch_remainder=pad, or data.mode=stream")
    spec = ReaderSpec(urls=tuple(shards.urls), counts=counts, mode=data_cfg.mode,
                      remainder=data_cfg.epoch_remainder, seed=seed, rank=rank, world_size=world_size,
                      workers=workers, batch_size=batch_size, channels=channels, resolution=resolution,
                      shuffle_buffer=data_cfg.shuffle_buffer, flip=data_cfg.flip, num_classes=num_classes)
    if data_cfg.mode == "epoch" and rank == 0:
        per_epoch = spec.batches_per_epoch * batch_size * spec.slots
        diff = per_epoch - sum(counts)  # type: ignore[arg-type]
        how = f"{diff} padded" if diff >= 0 else f"{-diff} dropped"
        log(f"data: {len(shards.urls)} shards, {sum(counts)} samples; epoch = {spec.batches_per_epoch} batches "  # type: ignore[arg-type]
            f"of {batch_size} per reader x {spec.slots} readers ({how} per epoch, data.epoch_remainder="
            f"{data_cfg.epoch_remainder})")
    return ShardLoader(shards, spec, device, data_cfg.num_workers, data_cfg.prefetch_factor,
                       data_cfg.max_skip_fraction, log)


__all__ = ["Batch", "ReaderSpec", "ShardLoader", "SlotReader", "build_loader", "check_compatible"]
