"""Checkpoints that survive crashes, full disks and preemption, and resume bit for bit.

A checkpoint is a directory under the checkpoint root (`train.ckpt_dir`, by default
`<run.dir>/checkpoints`)::

    step000001000/
        models.pt          G, D, both optimizers and loss scalers (the strategy writes what it
                           owns here: rank 0 alone for none/DDP, shards for sharded strategies)
        trainer.pt         step, images seen, resolved config, non-finite counters, EMA
        generator.pt       G's full state_dict, usable without the strategy (e.g. after FSDP)
        rank00000.pt ...   per rank: torch/numpy/python/CUDA RNG states, the noise generator,
                           the data reader's position
        config.yaml        the resolved config, for people
        manifest.json      size and sha256 of every file above
    latest                 the name of the newest complete checkpoint

Saving is all or nothing: everything is written into `.tmp-<name>-<id>/`, fsynced, hashed
into the manifest, and only then renamed to its final name; `latest` is replaced atomically
after that. A crash or a full disk at any point leaves the previous checkpoints and `latest`
as they were. Loading verifies the manifest (sizes and checksums) and reads every file with
`torch.load(weights_only=True)`.

The checkpoint root must be on a filesystem that every rank sees (as run.dir is).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch

from gan_dist import distributed as gdist
from gan_dist.atomic import TMP_PREFIX, fsync_dir, write_text_atomic
from gan_dist.distributed import DistInfo
from gan_dist.messages import note, warn

FORMAT = 1
MANIFEST = "manifest.json"
LATEST = "latest"
TRAINER_FILE = "trainer.pt"
GENERATOR_FILE = "generator.pt"  # inside a checkpoint: G's full state_dict, whatever the strategy
CHECKPOINTS_DIR = "checkpoints"  # the checkpoint root inside a run directory, unless train.ckpt_dir
CORRUPT_SUFFIX = ".corrupt"
STEP_DIR = re.compile(r"^step(\d+)$")
COMPATIBLE_STRATEGIES = ({"none", "ddp"},)  # strategies that read each other's checkpoints
MUST_MATCH = ("model.",)  # config keys that decide the shapes: a mismatch is an error
SHOULD_MATCH = ("train.batch_size", "train.grad_accum", "train.d_steps", "train.precision",
                "train.loss", "run.seed", "data.")  # a mismatch makes the resume inexact: warned


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, read or used; the message names the file and the fix."""


def step_dir_name(step: int) -> str:
    return f"step{step:09d}"


def rank_file_name(rank: int) -> str:
    return f"rank{rank:05d}.pt"


# ---- files ------------------------------------------------------------------------------------
class _KeepWriteError:
    """A file wrapper that remembers the OSError of a failed write: torch.save reports a full
    disk only as "unexpected pos", which names neither the cause nor the file."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.error: Optional[OSError] = None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.f.flush()


def save_file(obj: Any, path: Path) -> None:
    """torch.save and fsync: the bytes are on disk before the manifest claims them."""
    with open(path, "wb") as f:
        out = _KeepWriteError(f)
        try:
            torch.save(obj, out)
        except Exception:
            if out.error is not None:
                raise OSError(out.error.errno, out.error.strerror, str(path)) from None
            raise
        f.flush()
        os.fsync(f.fileno())


def write_text_durably(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def load_file(path: Path, map_location: Any = "cpu") -> Any:
    """torch.load(weights_only=True) with an error that names the file."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {str(path)!r} is missing") from None
    except Exception as exc:  # unpickling errors, truncation, refused globals
        raise CheckpointError(f"cannot read checkpoint file {str(path)!r}: {exc}") from None


def file_digest(path: Path, fsync: bool = False) -> tuple[int, str]:
    """(size, sha256) of a file; with `fsync`, also flush it to disk (any rank may have written it)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            size += len(chunk)
        if fsync:
            os.fsync(f.fileno())
    return size, h.hexdigest()


def list_files(directory: Path) -> list[str]:
    """Every regular file below `directory`, as sorted relative paths (the manifest excluded)."""
    out = [str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()]
    return sorted(n for n in out if n != MANIFEST)


# ---- collectives that never leave a rank behind ----------------------------------------------
def agree(error: Optional[str]) -> Optional[str]:
    """Every rank learns the first error any rank had, so that all of them fail together."""
    errors = [e for e in gdist.all_gather_object(error) if e]
    return errors[0] if errors else None


def _try(fn: Callable[[], Any]) -> tuple[Any, Optional[str]]:
    try:
        return fn(), None
    except CheckpointError as exc:
        return None, str(exc)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        return None, f"{exc.strerror or exc}{where}"
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"
    except BaseException as exc:
        failures = getattr(exc, "failures", None)  # torch.distributed.checkpoint's CheckpointException
        if not isinstance(failures, dict):
            raise
        return None, "; ".join(f"rank {r}: {type(e).__name__}: {e}" for r, (e, _) in sorted(failures.items()))


# ---- RNG --------------------------------------------------------------------------------------
def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's host and device RNG states, as tensors and plain types (weights_only)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "internal": torch.tensor(py_state[1], dtype=torch.int64),
                   "gauss_next": py_state[2]},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---- fitting a checkpoint to the model and the config ----------------------------------------
def load_model_state(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict, with an error listing every missing, unexpected or reshaped entry."""
    own = module.state_dict()
    problems = []
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing:
        problems.append(f"missing in the checkpoint: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"not in this model: {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
    for k, v in own.items():
        if k in state and tuple(state[k].shape) != tuple(v.shape):
            problems.append(f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(v.shape)}")
    if problems:
        raise CheckpointError(f"the checkpoint's {what} does not fit this run's model: " + "; ".join(problems))
    module.load_state_dict(state)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(saved: dict, current: dict, prefixes: Iterable[str]) -> list[str]:
    """'key: checkpoint X, this run Y' for every key under `prefixes` that differs."""
    a, b = _flatten(saved), _flatten(current)
    keys = sorted(k for k in set(a) | set(b) if any(k == p or k.startswith(p) for p in prefixes))
    return [f"{k}: checkpoint {a.get(k)!r}, this run {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def check_compatible(trainer_state: dict, current_config: dict, strategy_name: str, world_size: int,
                     path: Path) -> list[str]:
    """Raise when the checkpoint cannot be used by this run; return warnings when it can but the
    continuation will not be the run that would have happened."""
    if trainer_state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {str(path)!r} has format {trainer_state.get('format')!r}; "
                              f"this gan_dist reads format {FORMAT}")
    from gan_dist.config import Config, to_dict, upgrade_layout

    # a checkpoint of an older gan_dist: its config in today's layout, keys it predates at their defaults
    saved_config = _merge(to_dict(Config()), upgrade_layout(trainer_state["config"]))
    diffs = config_differences(saved_config, current_config, MUST_MATCH)
    if diffs:
        raise CheckpointError(f"checkpoint {str(path)!r} was written for a different model: "
                              + "; ".join(diffs) + ". Use the checkpoint's model settings, or another run.dir.")
    saved_strategy = trainer_state["strategy"]
    if saved_strategy != strategy_name and not any({saved_strategy, strategy_name} <= g for g in COMPATIBLE_STRATEGIES):
        raise CheckpointError(f"checkpoint {str(path)!r} was written by parallel.strategy={saved_strategy}; "
                              f"this run uses {strategy_name}: resume with parallel.strategy={saved_strategy}")
    warnings = [f"{d} (the resumed run will not repeat the original exactly)"
                for d in config_differences(saved_config, current_config, SHOULD_MATCH)]
    if "recipe" not in trainer_state:
        warnings.append("the checkpoint predates latents drawn per sample index: the resumed run draws other "
                        "latents than the original would have")
    if trainer_state["world_size"] != world_size:
        warnings.append(f"the checkpoint was written by {trainer_state['world_size']} processes, this run has "
                        f"{world_size}: per-rank RNG and data positions restart where they cannot be mapped")
    return warnings


# ---- the checkpoint directory -----------------------------------------------------------------
def latest_name(root: Path) -> Optional[str]:
    """The name `root/latest` gives the newest complete checkpoint, or None."""
    try:
        return (Path(root) / LATEST).read_text().strip() or None
    except OSError:
        return None


def is_checkpoint(path: Path) -> bool:
    """Whether `path` is one checkpoint directory (not a run directory or a checkpoint root)."""
    return (Path(path) / TRAINER_FILE).is_file()


def find_checkpoint(path: Path) -> Optional[Path]:
    """The checkpoint `path` names: itself when it is one, else the newest complete one that
    `latest` names under path/checkpoints or path (a run directory or a checkpoint root).
    Nothing is verified: `Checkpointer.find` does that before a resume."""
    path = Path(path)
    if is_checkpoint(path):
        return path
    for root in (path / CHECKPOINTS_DIR, path):
        name = latest_name(root)
        if name and (root / name).is_dir():
            return root / name
    return None


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete-looking checkpoints under `root`, newest (highest step) first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{str(path)!r} has no {MANIFEST} (an unfinished save?)") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{str(path / MANIFEST)!r} is unreadable: {exc}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{str(path / MANIFEST)!r} lists no files")
    return manifest


def verify(path: Path) -> Optional[str]:
    """Collective. None when every file of the checkpoint matches its manifest, else what does not.

    The files are hashed by all ranks together, each taking its share.
    """
    def local() -> Optional[str]:
        manifest = read_manifest(path)
        names = sorted(manifest["files"])
        for name in names:  # sizes: cheap, every rank checks all of them
            entry = manifest["files"][name]
            f = path / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != entry["size"]:
                return f"{name} has {f.stat().st_size} bytes, the manifest says {entry['size']}"
        r, w = gdist.rank(), gdist.world_size()
        for name in names[r::w]:
            if file_digest(path / name)[1] != manifest["files"][name]["sha256"]:
                return f"{name} does not match its sha256 in the manifest"
        return None

    problem, error = _try(local)
    return agree(problem if error is None else error)


class Checkpointer:
    """Writes, finds, verifies and loads the checkpoints of one run. Every method is collective."""

    def __init__(self, root: Path, keep: int, info: DistInfo) -> None:
        self.root = Path(root)
        self.keep = keep
        self.info = info
        error = None
        if info.is_main:
            _, error = _try(self._prepare)
        error = agree(error)
        if error:
            raise CheckpointError(f"cannot write checkpoints into {str(self.root)!r}: {error}. "
                                  "Set run.dir (or train.ckpt_dir) to a writable directory.")

    def _prepare(self) -> None:
        """Create the root, prove it is writable, and drop the remains of interrupted saves."""
        self.root.mkdir(parents=True, exist_ok=True)
        probe = self.root / f"{TMP_PREFIX}probe-{uuid.uuid4().hex}"
        write_text_durably(probe, "ok")
        probe.unlink()
        for p in self.root.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    # ---- saving ---------------------------------------------------------------------------
    def save(self, step: int, strategy: Any, trainer_state: dict, rank_state: dict, config_text: str,
             exports: Optional[dict[str, Any]] = None) -> Path:
        """Write checkpoint `step`; on any rank's failure, no trace of it and a CheckpointError everywhere.

        `exports` (rank 0's): more files for rank 0 to write, e.g. {"generator.pt": G's full state}.
        """
        name = step_dir_name(step)
        final = self.root / name
        tmp = None
        if self.info.is_main:
            tmp, error = _try(lambda: self._make_tmp(name))
        else:
            error = None
        tmp = gdist.broadcast_object(tmp)
        error = agree(error)
        if not error:
            _, error = _try(lambda: strategy.save_checkpoint(tmp))
            error = agree(error)
        if not error:
            _, error = _try(lambda: self._write_own_files(tmp, trainer_state, rank_state, config_text, exports))
            error = agree(error)
        digests: dict[str, Any] = {}
        if not error:
            names = gdist.broadcast_object(list_files(tmp) if self.info.is_main else None)
            mine, error = _try(lambda: self._digest_share(tmp, names))
            for part in gdist.all_gather_object(mine if not error else {}):
                digests.update(part or {})
            error = agree(error)
        if not error and self.info.is_main:
            _, error = _try(lambda: self._commit(tmp, final, step, strategy.name, digests))
        error = agree(error)
        if error:
            if self.info.is_main and tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            previous = self.latest_name()
            raise CheckpointError(
                f"saving checkpoint {name} into {str(self.root)!r} failed: {error}. "
                + (f"The previous checkpoint {previous} is intact." if previous else "No checkpoint was written."))
        return final

    def _make_tmp(self, name: str) -> Path:
        tmp = self.root / f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        return tmp

    def _write_own_files(self, tmp: Path, trainer_state: dict, rank_state: dict, config_text: str,
                         exports: Optional[dict[str, Any]]) -> None:
        save_file(rank_state, tmp / rank_file_name(self.info.rank))
        if self.info.is_main:
            save_file(trainer_state, tmp / TRAINER_FILE)
            write_text_durably(tmp / "config.yaml", config_text)
            for name, obj in (exports or {}).items():
                save_file(obj, tmp / name)

    def _digest_share(self, tmp: Path, names: list[str]) -> dict[str, dict]:
        r, w = self.info.rank, self.info.world_size
        out = {}
        for name in names[r::w]:
            size, digest = file_digest(tmp / name, fsync=True)
            out[name] = {"size": size, "sha256": digest}
        return out

    def _commit(self, tmp: Path, final: Path, step: int, strategy_name: str, digests: dict) -> None:
        manifest = {"format": FORMAT, "step": step, "strategy": strategy_name,
                    "world_size": self.info.world_size, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "files": dict(sorted(digests.items()))}
        write_text_durably(tmp / MANIFEST, json.dumps(manifest, indent=1))
        fsync_dir(tmp)
        if final.exists():  # left over from a run that was later resumed from an older checkpoint
            stale = final.with_name(f"{TMP_PREFIX}stale-{final.name}-{uuid.uuid4().hex[:8]}")
            final.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp.rename(final)
        fsync_dir(self.root)
        write_text_atomic(self.root / LATEST, final.name + "\n")
        for old in checkpoint_dirs(self.root)[self.keep:]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)

    def latest_name(self) -> Optional[str]:
        return latest_name(self.root)

    # ---- finding ----------------------------------------------------------------------------
    def find(self, resume: Optional[str]) -> Optional[Path]:
        """The checkpoint to resume from: the newest valid one of this run, else `train.resume`.

        This run's own checkpoints win, so that a requeued job continues itself rather than
        starting over from the checkpoint it was first started from. A damaged checkpoint of
        this run is renamed to `<name>.corrupt` (kept for inspection) with a warning.
        """
        own = self._newest_valid(self.root, own=True)
        if own is not None:
            if resume and self.info.is_main:
                note(f"train.resume={resume} is ignored: {str(self.root)!r} holds this run's own checkpoints, "
                     "continuing from the newest")
            return own
        if not resume:
            return None
        path = Path(resume)
        kind = None
        if self.info.is_main:
            is_checkpoint = (path / MANIFEST).exists() or STEP_DIR.match(path.name)
            kind = "none" if not path.is_dir() else "checkpoint" if is_checkpoint else "dir"
        kind = gdist.broadcast_object(kind)
        if kind == "none":
            raise CheckpointError(f"train.resume={resume}: no such directory")
        if kind == "checkpoint":
            problem = verify(path)
            if problem:
                raise CheckpointError(f"train.resume={resume} is damaged: {problem}")
            return path
        for where in (path / CHECKPOINTS_DIR, path):
            found = self._newest_valid(where, own=False)
            if found is not None:
                return found
        raise CheckpointError(f"train.resume={resume} holds no valid checkpoint (looked in {str(path)!r} "
                              f"and {str(path / CHECKPOINTS_DIR)!r})")

    def _newest_valid(self, root: Path, own: bool) -> Optional[Path]:
        candidates = gdist.broadcast_object([str(p) for p in checkpoint_dirs(root)] if self.info.is_main else None)
        for c in map(Path, candidates):
            problem = verify(c)
            if problem is None:
                return c
            if self.info.is_main:
                if own:
                    moved = c.with_name(c.name + CORRUPT_SUFFIX)
                    if moved.exists():
                        moved = c.with_name(f"{c.name}{CORRUPT_SUFFIX}-{uuid.uuid4().hex[:8]}")
                    _, err = _try(lambda: c.rename(moved))
                    where = f"moved to {moved.name}" if err is None else "left in place"
                else:
                    where = "left in place"
                warn(f"checkpoint {str(c)!r} is damaged ({problem}); skipping it ({where}) "
                     "and trying the previous one")
        return None

    # ---- loading ----------------------------------------------------------------------------
    def load(self, path: Path, strategy: Any, config: dict) -> tuple[dict, Optional[dict]]:
        """Check that `path` fits this run, restore the strategy's state (models, optimizers,
        loss scalers) and return (trainer state, this rank's state or None)."""
        def read() -> tuple[dict, list[str]]:
            state = load_file(path / TRAINER_FILE)
            return state, check_compatible(state, config, strategy.name, self.info.world_size, path)

        result, error = _try(read)
        error = agree(error)
        if error:
            raise CheckpointError(error)
        trainer_state, warnings = result
        if self.info.is_main:
            for w in warnings:
                warn(f"resuming from {str(path)!r}: {w}")
        _, error = _try(lambda: strategy.load_checkpoint(path))
        error = agree(error)
        if error:
            raise CheckpointError(f"cannot restore {str(path)!r}: {error}")
        rank_path = path / rank_file_name(self.info.rank)
        rank_state, error = _try(lambda: load_file(rank_path) if rank_path.is_file() else None)
        error = agree(error)
        if error:
            raise CheckpointError(error)
        return trainer_state, rank_state


# ---- the best evaluation so far (train.keep_best) ---------------------------------------------------
BEST_DIR = "best"  # <run.dir>/best/: generator.pt, generator_ema.pt, config.yaml, best.json
BEST_INFO = "best.json"


def best_value(run_dir: Path, metric: str) -> Optional[float]:
    """The `metric` value of the generator kept in <run_dir>/best/, if any (survives a resume)."""
    try:
        info = json.loads((Path(run_dir) / BEST_DIR / BEST_INFO).read_text())
        return float(info[metric])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_best(run_dir: Path, exports: dict[str, Any], config_yaml: str, info: dict) -> Path:
    """Replace <run_dir>/best/ with these generator weights as a whole: written into a temporary
    directory, fsynced, then renamed over the old one. `--ckpt <run>/best` reads it like a run."""
    run_dir = Path(run_dir)
    tmp = run_dir / f"{TMP_PREFIX}{BEST_DIR}-{uuid.uuid4().hex[:8]}"
    final = run_dir / BEST_DIR
    old = run_dir / f"{TMP_PREFIX}{BEST_DIR}-old-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        for name, state in exports.items():
            save_file(state, tmp / name)
        write_text_durably(tmp / "config.yaml", config_yaml)
        write_text_durably(tmp / BEST_INFO, json.dumps(info, indent=1))
        fsync_dir(tmp)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        fsync_dir(run_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return final
