"""Counting what the reader read, skipped, padded and dropped, per shard, across processes.

Loader workers count into a `Tally` and send the increments along with each batch, so the
main process counts exactly the batches it consumed (the counts and the reader position
always agree, which is what makes them checkpointable). `DataStats` holds one rank's totals;
`global_summary` adds up all ranks (a collective) and `check_skip_fraction` turns too much
bad data into an error that names the worst shards.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Optional, Sequence

import numpy as np
import torch

from gan_dist.data.decode import REASON_TEXT, REASONS
from gan_dist.data.manifest import DataError

WORST_SHARDS = 5


class Tally:
    """Worker-side increments since the last batch."""

    def __init__(self) -> None:
        self.enabled = True
        self.clear()

    def clear(self) -> None:
        self.read: Counter = Counter()  # shard -> samples read (good or bad)
        self.bad: Counter = Counter()  # (shard, reason) -> samples skipped
        self.padded = 0
        self.dropped = 0

    def good(self, shard: int) -> None:
        if self.enabled:
            self.read[shard] += 1

    def skip(self, shard: int, reason: str, n: int = 1) -> None:
        if self.enabled and n > 0:
            self.read[shard] += n
            self.bad[(shard, reason)] += n

    def take(self) -> dict[str, Any]:
        out = {"read": dict(self.read), "bad": dict(self.bad), "padded": self.padded, "dropped": self.dropped}
        self.clear()
        return out


class DataStats:
    """One rank's cumulative counts (only of batches the training loop has taken)."""

    def __init__(self, num_shards: int) -> None:
        self.read = np.zeros(num_shards, dtype=np.int64)
        self.skipped = np.zeros(num_shards, dtype=np.int64)
        self.reasons: Counter = Counter()  # (shard, reason) -> n
        self.padded = 0
        self.dropped = 0

    def add(self, tally: dict[str, Any]) -> None:
        for shard, n in tally["read"].items():
            self.read[shard] += n
        for (shard, reason), n in tally["bad"].items():
            self.skipped[shard] += n
            self.reasons[(shard, reason)] += n
        self.padded += tally["padded"]
        self.dropped += tally["dropped"]

    def reason_totals(self) -> dict[str, int]:
        out = {r: 0 for r in REASONS}
        for (_, reason), n in self.reasons.items():
            out[reason] += n
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"read": torch.from_numpy(self.read.copy()), "skipped": torch.from_numpy(self.skipped.copy()),
                "reasons": [[int(s), r, int(n)] for (s, r), n in sorted(self.reasons.items())],
                "padded": int(self.padded), "dropped": int(self.dropped)}

    def load_state_dict(self, sd: dict[str, Any], same_shards: bool) -> None:
        self.padded, self.dropped = int(sd["padded"]), int(sd["dropped"])
        if same_shards:
            self.read = np.asarray(sd["read"], dtype=np.int64).copy()
            self.skipped = np.asarray(sd["skipped"], dtype=np.int64).copy()
            self.reasons = Counter({(int(s), str(r)): int(n) for s, r, n in sd["reasons"]})


def shard_report(urls: Sequence[str], read: np.ndarray, skipped: np.ndarray,
                 reasons: dict[tuple[int, str], int], limit: Optional[int] = None) -> list[dict[str, Any]]:
    """Shards with skipped samples, worst first: url, read, skipped, and why."""
    bad = np.flatnonzero(skipped)
    bad = bad[np.lexsort((bad, -skipped[bad]))]
    if limit is not None:
        bad = bad[:limit]
    out = []
    for i in bad:
        why = {r: n for (s, r), n in reasons.items() if s == i}
        out.append({"url": urls[i], "read": int(read[i]), "skipped": int(skipped[i]),
                    "reasons": dict(sorted(why.items(), key=lambda kv: -kv[1]))})
    return out


def global_summary(stats: DataStats, urls: Sequence[str], extra: Sequence[float] = ()) -> dict[str, Any]:
    """All ranks' counts added up (call on every rank at the same point). `extra`: more
    per-rank numbers to add up, returned as "extra"."""
    import torch.distributed as dist

    n = len(urls)
    reason_totals = stats.reason_totals()
    flat = np.concatenate([stats.read, stats.skipped,
                           [stats.padded, stats.dropped], [reason_totals[r] for r in REASONS], list(extra)])
    t = torch.from_numpy(flat.astype(np.float64))
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed:
        on_gpu = dist.get_backend() == "nccl"  # NCCL reduces device tensors only
        t = t.to(torch.device("cuda", torch.cuda.current_device())) if on_gpu else t
        dist.all_reduce(t)
        t = t.cpu()
    v = t.numpy()
    read, skipped = v[:n].astype(np.int64), v[n:2 * n].astype(np.int64)
    rest = v[2 * n:]
    padded, dropped = int(rest[0]), int(rest[1])
    by_reason = {r: int(x) for r, x in zip(REASONS, rest[2:2 + len(REASONS)]) if x}
    reasons: dict[tuple[int, str], int] = dict(stats.reasons)
    total_skipped = int(skipped.sum())
    if distributed and total_skipped:  # the same decision on every rank: all take part
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, dict(stats.reasons))
        reasons = Counter()
        for part in gathered:
            reasons.update(part)
    total_read = int(read.sum())
    return {
        "read": total_read,
        "skipped": total_skipped,
        "skip_fraction": total_skipped / total_read if total_read else 0.0,
        "padded": padded,
        "dropped": dropped,
        "by_reason": by_reason,
        "worst_shards": shard_report(urls, read, skipped, reasons, limit=WORST_SHARDS),
        "extra": [float(x) for x in rest[2 + len(REASONS):]],
    }


def describe_shards(report: list[dict[str, Any]]) -> str:
    parts = []
    for s in report:
        why = ", ".join(f"{REASON_TEXT.get(r, r)}: {n}" for r, n in s["reasons"].items())
        parts.append(f"{s['url']} ({s['skipped']} of {s['read']} bad; {why})")
    return "; ".join(parts)


def check_skip_fraction(summary: dict[str, Any], max_fraction: float, final: bool = False) -> None:
    """DataError when more than `max_fraction` of what was read is bad.

    Judged once enough has been read that one bad sample cannot cross the limit on its own
    (10 / max_fraction samples), and always at the end of a run.
    """
    read, skipped = summary["read"], summary["skipped"]
    if not read or skipped / read <= max_fraction:
        return
    if not final and max_fraction > 0 and read < 10 / max_fraction:
        return
    raise DataError(
        f"data: {skipped} of {read} samples read ({100 * skipped / read:.2f}%) were bad, more than "
        f"data.max_skip_fraction={max_fraction}. Worst shards: {describe_shards(summary['worst_shards'])}. "
        "Fix or remove these shards (python -m gan_dist.shards rewrites a folder of images), "
        "or raise data.max_skip_fraction.")
