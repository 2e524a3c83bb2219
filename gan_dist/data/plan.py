"""Who reads what: the split of the shards over ranks x loader workers ("reader slots").

Epoch mode. Each epoch, the shards are put in a random order (the same on every rank),
their samples are laid end to end, and the N samples are cut into S = world_size x workers
contiguous pieces of N // S or N // S + 1 samples. Slot s = rank x workers + worker reads
piece s: whole shards, plus at most a tail and a head of shards it shares with its
neighbours (a sample range of a shard). So every sample belongs to exactly one slot, however
uneven the shards are, and fewer shards than slots needs no special case: slots then read
disjoint sample ranges of the same shard.

Every slot delivers the same number of batches per epoch, T, so every rank does too and the
epoch boundaries of all ranks line up:
  - remainder "pad":  T = ceil(ceil(N / S) / B); a slot fills its last batch by reading its own
    samples again (counted as padded);
  - remainder "drop": T = floor(floor(N / S) / B); the samples a slot has left over are
    counted as dropped (different ones each epoch, since the order changes).
A slot that loses samples to bad data fills up the same way as "pad".

Stream mode. Endless; slot s reads the shards order[s::S] of its own epoch's order (or, with
fewer shards than slots, every shard keeping every S-th sample), so slots read disjoint
shards, and the order is reseeded every epoch. No counts are needed and slots do not wait
for each other.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

MASK64 = (1 << 64) - 1
_ORDER_TAG = 0x0DE2
_SHUFFLE_TAG = 0x5F1E
_FLIP_TAG = 0xF11B


def _splitmix(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def mix(*values: int) -> int:
    """A 64-bit seed from several integers; the same on every platform and process."""
    h = 0
    for v in values:
        h = _splitmix(h ^ (int(v) & MASK64))
    return h


def shard_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng(mix(seed, epoch, _ORDER_TAG)).permutation(n)


def shuffle_seed(seed: int, epoch: int, slot: int, pass_: int) -> int:
    return mix(seed, epoch, slot, pass_, _SHUFFLE_TAG)


def flip_bit(seed: int, epoch: int, slot: int, pass_: int, pos: int) -> bool:
    """Whether the pos-th sample of a slot's epoch is mirrored: a function of its position,
    so a resumed reader flips exactly what the uninterrupted one would have."""
    return bool(mix(seed, epoch, slot, pass_, pos, _FLIP_TAG) & 1)


@dataclass(frozen=True)
class Range:
    """Samples start <= i < stop (every `stride`-th from `start + offset`) of one shard."""

    shard: int
    start: int = 0
    stop: Optional[int] = None  # None: to the end of the shard
    to_end: bool = True  # the range ends where the shard ends: read on to check the archive's end
    stride: int = 1
    offset: int = 0

    @property
    def length(self) -> Optional[int]:
        return None if self.stop is None else self.stop - self.start


def batches_per_epoch(total: int, slots: int, batch_size: int, remainder: str) -> int:
    """T: batches every slot delivers per epoch (see the module docstring)."""
    q, r = divmod(total, slots)
    if remainder == "pad":
        return math.ceil((q + (1 if r else 0)) / batch_size)
    return q // batch_size


def epoch_ranges(counts: Sequence[int], seed: int, epoch: int, slot: int, slots: int) -> list[Range]:
    """The sample ranges slot `slot` reads in `epoch` (epoch mode)."""
    order = shard_order(seed, epoch, len(counts))
    c = np.asarray(counts, dtype=np.int64)[order]
    ends = np.cumsum(c)
    starts = ends - c
    total = int(ends[-1]) if len(ends) else 0
    lo, hi = slot * total // slots, (slot + 1) * total // slots
    first = min(int(np.searchsorted(ends, lo, side="right")), int(np.searchsorted(starts, lo, side="left")))
    last = len(order) if slot == slots - 1 else int(np.searchsorted(starts, hi, side="left"))
    out = []
    for j in range(first, last):
        s, e = int(starts[j]), int(ends[j])
        if s == e:  # an empty shard: the slot whose piece it falls in checks it
            if lo <= s < hi or (slot == slots - 1 and s == total):
                out.append(Range(int(order[j]), 0, 0, True))
            continue
        a, b = max(s, lo) - s, min(e, hi) - s
        if a < b:
            out.append(Range(int(order[j]), a, b, b == e - s))
    return out


def stream_ranges(num_shards: int, seed: int, epoch: int, slot: int, slots: int) -> list[Range]:
    """The shards slot `slot` reads in its `epoch` (stream mode)."""
    order = shard_order(seed, epoch, num_shards)
    if num_shards >= slots:
        return [Range(int(i)) for i in order[slot::slots]]
    return [Range(int(i), stride=slots, offset=slot) for i in order]
