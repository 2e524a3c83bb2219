"""`data.urls` -> the list of shards and their sample counts, checked before training starts.

Accepted forms: a brace pattern (`/data/x-{000000..000127}.tar`), a list of them, a directory
(its manifest.json, else every *.tar inside), or a manifest JSON (written by
`python -m gan_dist.shards`, or a WebDataset `wids` index with a "shardlist"). Local paths
must exist. Remote URLs (http, gs, ...) and `pipe:` commands are opened with curl, gsutil or
the shell, so they are refused unless `data.allow_pipe=true`.

Epoch mode needs each shard's sample count to hand every reader the same number of
batches; counts come from a manifest next to the shards (checked against the file size) or,
failing that, from reading the tar headers once at startup.
"""
from __future__ import annotations

import hashlib
import os
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from gan_dist.data.decode import SAMPLE_IMAGE_EXTS
from gan_dist.data.demo import ensure_demo_shards
from gan_dist.data.manifest import MANIFEST, META_KEYS, DataError, read_manifest
from gan_dist.data.tario import TarError, is_remote, iter_samples, local_path, open_shard, shard_size
from gan_dist.data.writer import SOURCE_EXTS

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


@dataclass
class ShardSet:
    """The shards of a run; identical on every rank (rank 0 resolves, then broadcasts)."""

    urls: list[str]
    counts: Optional[list[int]] = None  # samples per shard; None where not needed (stream mode)
    resolution: Optional[int] = None  # from a manifest: what the writer produced
    channels: Optional[int] = None
    image_format: Optional[str] = None
    notes: list[str] = field(default_factory=list)  # warnings found while resolving

    @property
    def total(self) -> Optional[int]:
        return None if self.counts is None else int(sum(self.counts))

    def fingerprint(self) -> str:
        """Identifies the data a reader position refers to."""
        h = hashlib.sha1()
        for i, url in enumerate(self.urls):
            h.update(url.encode())
            h.update(str(self.counts[i] if self.counts else "").encode())
        return h.hexdigest()[:16]


def _refuse_remote(url: str, allow_pipe: bool) -> None:
    if is_remote(url) and not allow_pipe:
        raise DataError(
            f"data.urls: {url!r} is a remote or pipe: URL; opening it runs a client or shell command, "
            "so it is refused unless data.allow_pipe=true")


def expand_urls(urls: str | Sequence[str], allow_pipe: bool = False) -> list[str]:
    """Brace patterns, lists, directories and manifests -> a list of shard URLs."""
    return _expand(urls, allow_pipe)[0]


def _expand(urls: str | Sequence[str], allow_pipe: bool) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """(shard URLs, {url: what a manifest says about it})."""
    import braceexpand

    items = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    known: dict[str, dict[str, Any]] = {}
    missing: list[str] = []
    files: list[str] = []  # the local files of one item, checked together

    def add_manifest(path: Path) -> None:
        m = read_manifest(path)
        gone = []
        for i, url in enumerate(m["urls"]):
            _refuse_remote(url, allow_pipe)
            if not is_remote(url) and not os.path.isfile(local_path(url)):
                gone.append(url)
            out.append(url)
            known[url] = {"count": m["counts"][i], "bytes": m["bytes"][i], **{k: m[k] for k in META_KEYS}}
        if gone:
            more = f" and {len(gone) - 1} more (the last {gone[-1]!r})" if len(gone) > 1 else ""
            raise DataError(
                f"data.urls: manifest {str(path)!r} lists {len(gone)} of its {len(m['urls'])} shards that do not "
                f"exist: {gone[0]!r}{more}; copy them back, or point data.urls at the shards that are there "
                f"(python -m gan_dist.shards --verify {shlex.quote(str(path.parent))} lists what is wrong)")

    for item in items:
        if not isinstance(item, str) or not item:
            raise DataError(f"data.urls: {item!r} is not a shard URL")
        for url in braceexpand.braceexpand(item):
            _refuse_remote(url, allow_pipe)
            if is_remote(url):
                out.append(url)
                continue
            path = Path(local_path(url))
            if path.is_dir():
                if (path / MANIFEST).is_file():
                    add_manifest(path / MANIFEST)
                    continue
                found = sorted(str(p) for p in path.iterdir() if p.name.endswith(SHARD_SUFFIXES) and p.is_file())
                if not found:
                    raise DataError(_not_a_shard_folder(path))
                _check_are_shards(found, f"directory {str(path)!r}")
                out.extend(found)
            elif path.is_file() and path.suffix == ".json":
                add_manifest(path)
            elif path.is_file():
                out.append(str(path))
                files.append(str(path))
            else:
                missing.append(url)
        if files:
            _check_are_shards(files, f"{item!r}")
            files.clear()
    if missing:
        more = f" (nor do {len(missing) - 1} more, the last {missing[-1]!r})" if len(missing) > 1 else ""
        raise DataError(f"data.urls: shard {missing[0]!r} does not exist{more}")
    if not out:
        raise DataError(f"data.urls={urls!r} names no shards")
    duplicates = sorted({u for u in out if out.count(u) > 1}) if len(out) < 100_000 else []
    if duplicates:
        raise DataError(f"data.urls names shard {duplicates[0]!r} more than once")
    return out, known


def _not_a_shard_folder(path: Path) -> str:
    """Why a directory without .tar files or a manifest cannot be data.urls, and what to do."""
    entries = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
    if not entries:
        return f"data.urls: directory {str(path)!r} is empty (no .tar shards, no {MANIFEST})"
    image = _first_image(path)
    if image is not None:
        out = path.parent / f"{path.name}-shards"
        return (f"data.urls: directory {str(path)!r} holds images (such as {str(image)!r}), not shards; "
                f"write shards from them (add --resolution R to crop and resize, --channels 1 for grayscale) with\n"
                f"    python -m gan_dist.shards --src {shlex.quote(str(path))} --out {shlex.quote(str(out))}\n"
                f"and train with data.urls={shlex.quote(str(out))}")
    shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    return (f"data.urls: directory {str(path)!r} holds no .tar shards, no {MANIFEST} and no images "
            f"(it has: {shown})")


def _first_image(root: Path, max_dirs: int = 200) -> Optional[Path]:
    """An image file in `root` or its sub-folders (class folders), looking into a few only."""
    for n, (folder, dirs, names) in enumerate(os.walk(root)):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.lower().endswith(SOURCE_EXTS) and not name.startswith("."):
                return Path(folder) / name
        if n >= max_dirs:
            break
    return None


def _not_a_shard(url: str) -> Optional[str]:
    """What shows that a local file is no WebDataset shard, or None (a shard, or an empty or
    damaged one, which the reader skips and counts)."""
    try:
        with open_shard(url) as stream:
            for _, key, members in iter_samples(stream, want=lambda i: False, size=shard_size(url, stream)):
                if not any(ext in members for ext in SAMPLE_IMAGE_EXTS):
                    exts = ", ".join(f".{e}" if e else "(no extension)" for e in sorted(members))
                    return (f"its first sample {key!r} has {exts} but no image "
                            f"({', '.join('.' + e for e in SAMPLE_IMAGE_EXTS)})")
                return None
    except TarError as exc:
        return f"it is not a tar archive ({exc})" if "checksum" in str(exc) else None
    except (OSError, EOFError):
        return None
    return None


PROBED = 8  # files of one data.urls entry looked into before they are all called non-shards


def _check_are_shards(urls: list[str], where: str) -> None:
    """DataError when the first files of `where` are all tar files that hold no samples, or
    no tar files at all: a folder of other archives, a source tarball, a mistyped path."""
    problems = []
    for url in urls[:PROBED]:
        problem = _not_a_shard(url)
        if problem is None:
            return
        problems.append((url, problem))
    shown = "; ".join(f"{url!r}: {problem}" for url, problem in problems[:3])
    more = f" (and the other {len(problems) - 3} looked into)" if len(problems) > 3 else ""
    within = "" if where == repr(urls[0]) else f" in {where}"
    raise DataError(f"data.urls: no WebDataset shards{within}: {shown}{more}; shards are tar files of samples "
                    "such as 000001.png + 000001.cls, as python -m gan_dist.shards writes them")


def _sibling_manifest_counts(urls: list[str], known: dict[str, dict[str, Any]]) -> None:
    """Counts for local shards from a manifest.json in their directory, where sizes match."""
    cache: dict[Path, Optional[dict[str, Any]]] = {}
    for url in urls:
        if url in known or is_remote(url):
            continue
        path = Path(local_path(url))
        folder = path.parent
        if folder not in cache:
            cache[folder] = None
            if (folder / MANIFEST).is_file():
                try:
                    m = read_manifest(folder / MANIFEST)
                except DataError:
                    m = None
                if m is not None:
                    cache[folder] = {str(Path(u).resolve()): {"count": m["counts"][i], "bytes": m["bytes"][i],
                                                              **{k: m[k] for k in META_KEYS}}
                                     for i, u in enumerate(m["urls"])}
        entry = (cache[folder] or {}).get(str(path.resolve()))
        if entry is not None:
            known[url] = entry


def count_shard(url: str) -> tuple[int, Optional[str]]:
    """(readable samples, problem) for one shard; DataError if it cannot be opened at all."""
    try:
        stream = open_shard(url)
    except OSError as exc:
        raise DataError(f"data.urls: shard {url!r} cannot be opened: {exc}") from None
    n = 0
    try:
        with stream:
            for _ in iter_samples(stream, want=lambda i: False, size=shard_size(url, stream)):
                n += 1
    except OSError as exc:  # also a pipe: command that failed
        if n == 0:
            raise DataError(f"data.urls: shard {url!r} cannot be read: {exc}") from None
        return n, str(exc)
    except (TarError, EOFError) as exc:
        return n, str(exc)
    return n, None


def resolve_shards(data_cfg: Any, need_counts: bool,
                   log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> ShardSet:
    """Expand `data.urls` (demo digits when unset), check every local shard exists, find counts."""
    if data_cfg.urls in (None, "", []):
        urls, known = _expand(str(Path(ensure_demo_shards()[0]).parent), allow_pipe=False)
    else:
        urls, known = _expand(data_cfg.urls, data_cfg.allow_pipe)
    _sibling_manifest_counts(urls, known)
    shards = ShardSet(urls=urls)
    metas = [known[u] for u in urls if u in known]
    if metas and len(metas) == len(urls):
        for key in ("resolution", "channels", "image_format"):
            values = {m.get(key) for m in metas}
            if len(values) == 1:
                setattr(shards, key, values.pop())
    if not need_counts:
        return shards
    counts: list[Optional[int]] = []
    for url in urls:
        entry = known.get(url)
        count = entry.get("count") if entry else None
        size = entry.get("bytes") if entry else None
        if count is not None and size is not None and not is_remote(url):
            actual = os.path.getsize(local_path(url))
            if actual != size:
                shards.notes.append(f"shard {url!r} is {actual} bytes but its manifest says {size}: recounted")
                count = None
        counts.append(count)
    missing = [i for i, c in enumerate(counts) if c is None]
    if missing:
        started = time.time()
        with ThreadPoolExecutor(max_workers=min(16, len(missing))) as pool:
            results = list(pool.map(count_shard, [urls[i] for i in missing]))
        for i, (n, problem) in zip(missing, results):
            counts[i] = n
            if problem:
                shards.notes.append(f"shard {urls[i]!r}: {problem}; its first {n} samples are used")
        log(f"data: counted the samples of {len(missing)} shard(s) without a manifest in "
            f"{time.time() - started:.1f} s (`python -m gan_dist.shards` writes one)")
    shards.counts = [int(c) for c in counts]  # type: ignore[arg-type]
    for note in shards.notes:
        log(f"data: warning: {note}")
    if shards.total == 0:
        raise DataError(f"data.urls: the {len(urls)} shard(s) hold no samples (first: {urls[0]!r})")
    return shards
