"""A training run: build everything from the config, run the loop, write the outputs.

Rank 0 alone writes into run.dir. Everything that may involve a collective (sampling with a
sharded G, gathering a full state_dict) is called on every rank.
"""
from __future__ import annotations

import contextlib
import json
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from gan_dist import distributed as gdist
from gan_dist.schedules import Schedules
from gan_dist.atomic import save_torch_atomic, write_text_atomic
from gan_dist.checkpoint import CHECKPOINTS_DIR, FORMAT, GENERATOR_FILE, Checkpointer, rng_state, set_rng_state
from gan_dist.config import Config, ConfigError, to_dict, to_yaml, validate
from gan_dist.data import DataError, make_loader, shared_shards
from gan_dist.distributed import DistInfo
from gan_dist.ema import build_ema
from gan_dist.faults import (EXIT_RETRY, FaultInjector, NonFiniteError, NonFiniteGuard, StepAgreement,
                             StopSignals, signal_name)
from gan_dist.runlog import RunLogger, Throughput, save_grid
from gan_dist.messages import note, warn
from gan_dist.loop import Batch, train_step
from gan_dist.build import setup_models, step_batches
from gan_dist.parallel import build_strategy

NUM_SAMPLES = 64  # images in a sample grid


def seed_everything(seed: int, rank: int) -> None:
    """Per-rank host RNGs; model initialisation uses its own seed, identical on all ranks."""
    random.seed(seed * 1000 + rank)
    np.random.seed((seed * 1000 + rank) % 2**32)
    torch.manual_seed(seed * 1000 + rank)


def package_versions() -> dict[str, Optional[str]]:
    from importlib import metadata

    out: dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "accelerate", "webdataset", "deepspeed", "gan_dist"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def default_run_dir() -> str:
    """runs/<timestamp>, chosen by rank 0 so that all ranks agree."""
    return gdist.broadcast_object(time.strftime("runs/%Y%m%d-%H%M%S"))


def resolve_data_shape(cfg: Config, urls: list[str], is_main: bool) -> dict[str, Any]:
    """Fill `model.channels` / `model.resolution` / `model.num_classes` given as `auto` from the
    data (its manifest, else its first sample, else a scan of the labels), and check explicit
    values against it. Collective: the main rank reads the data and every rank gets the answer
    (or the same DataError). Returns what run_info.json records (with `class_counts` when
    train.fake_labels=data)."""
    from gan_dist.data.shape import class_counts, data_shape

    k = cfg.model.num_classes
    result: Any = None
    if is_main:
        try:
            result = data_shape(urls, scan_labels=k != 0)
            if k != 0 and cfg.train.fake_labels == "data":
                result = (result, class_counts(urls))
        except DataError as exc:
            result = exc
    result = gdist.broadcast_object(result)
    if isinstance(result, DataError):
        raise DataError(str(result))
    counts = None
    if isinstance(result, tuple):
        result, counts = result
    used: dict[str, Any] = {"auto": []}
    for key, found in (("channels", result.channels), ("resolution", result.resolution)):
        value = getattr(cfg.model, key)
        if value == "auto":
            setattr(cfg.model, key, found)
            used["auto"].append(key)
        elif value != found:
            what = {1: "grayscale", 3: "RGB"}.get(found, found) if key == "channels" else f"{found}x{found}"
            raise ConfigError(f"model.{key}={value} but the data is {what} ({result.origin}): "
                              f"set model.{key}={found} or model.{key}=auto")
        used[key] = found
    if k != 0:
        found = result.num_classes or 0
        if found == 0:
            raise DataError(f"model.num_classes={k}: the shards ({result.origin}) carry no class labels (.cls); "
                            "use labelled shards (python -m gan_dist.shards writes the class folders as labels) "
                            "or model.num_classes=0")
        if k == "auto":
            cfg.model.num_classes = found
            used["auto"].append("num_classes")
        elif k < found:
            raise ConfigError(f"model.num_classes={k} but the data has labels up to {found - 1} ({result.origin}): "
                              f"set model.num_classes={found} or model.num_classes=auto")
        used["num_classes"] = cfg.model.num_classes
        if counts is not None:
            used["class_counts"] = counts + [0] * (cfg.model.num_classes - len(counts))
    validate(cfg)  # the family checks the shape it now has (e.g. DCGAN: 32 or 64 px)
    return {**used, "source": result.source, "origin": result.origin}


class Trainer:
    def __init__(self, cfg: Config, info: DistInfo) -> None:
        self.cfg, self.info = cfg, info
        self.device = info.device
        if cfg.run.dir is None:
            cfg.run.dir = default_run_dir()
        self.run_dir = Path(cfg.run.dir)
        shards = shared_shards(cfg, info.is_main, gdist.broadcast_object)
        self.urls = shards.urls
        self.data_shape = resolve_data_shape(cfg, self.urls, info.is_main)  # model.channels/resolution=auto
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))  # resolved: what generate/evaluate rebuild
        seed_everything(cfg.run.seed, info.rank)

        self.strategy = build_strategy(info, cfg)
        self.schedules = Schedules(cfg)  # lr, beta2, gammas, EMA half-life: built at their start values
        self.recipe, self.spec, self.params = setup_models(self.strategy, self.schedules.initial)
        self.ema = build_ema(self.strategy, self.schedules.initial.ema)  # before resuming: checkpoints hold its state

        self.data = make_loader(cfg, shards, info.rank, info.world_size, self.device)
        self.data_summary: Optional[dict] = None  # all ranks' data counts, as of the last log
        from gan_dist.metrics.evaluation import training_evaluator
        self.evaluator = training_evaluator(cfg, self.urls, self.device, info.is_main)
        self.class_eval = None  # a conditional model's per-class metrics (intra-class FD, digits accuracy)
        if self.evaluator is not None and cfg.model.num_classes and "main" in self.evaluator.extractors:
            from gan_dist.metrics.conditional import class_evaluator
            self.class_eval = class_evaluator(cfg, self.urls, self.evaluator.extractors["main"],
                                              cfg.model.num_classes, self.evaluator.nz)
        self.last_eval: Optional[dict] = None
        self.fixed_noise = torch.randn(NUM_SAMPLES, self.spec.z_dim,
                                       generator=torch.Generator().manual_seed(cfg.run.seed)).to(self.device)
        # a conditional model's grid: one class per row of 8 (classes 0-7 of more)
        K = self.spec.num_classes
        self.fixed_labels = (torch.arange(NUM_SAMPLES, device=self.device) // 8) % K if K else None
        self.class_counts = self.data_shape.get("class_counts")  # train.fake_labels=data
        self.step = 0
        self.images_seen = 0
        t = cfg.train
        self.images_per_step = t.batch_size * t.grad_accum * t.d_steps * info.world_size
        self.guard = NonFiniteGuard(self.strategy)
        FaultInjector.install(self)  # test-only: replaces next_batches when GAN_DIST_INJECT_NAN is set
        self.ckpt = Checkpointer(Path(t.ckpt_dir) if t.ckpt_dir else self.run_dir / CHECKPOINTS_DIR,
                                 t.keep_ckpts, info)
        self.last_saved_step: Optional[int] = None
        self.resumed_from = self.maybe_resume()
        self.skipped_seen = self.strategy.skipped_updates  # as of the last agreed record
        self.started = time.time()
        self.logger = RunLogger(self.run_dir, info.is_main, t.steps, self.step)
        self.write_run_info("running")

    # ---- the loop -------------------------------------------------------------------------
    def next_batches(self) -> list[list[Batch]]:
        next_real = self.data.next_labelled if self.spec.num_classes else (lambda: next(self.data))
        return step_batches(self.cfg, self.spec, self.step, self.info.rank, self.info.world_size,
                            next_real, self.device, self.class_counts)

    def fit(self) -> int:
        """Train up to train.steps (a total: a resumed run continues). Returns the exit code:
        0, or EXIT_RETRY when a stop signal ended the run after a checkpoint."""
        t = self.cfg.train
        meter = Throughput()
        meter.tick(self.images_seen)
        if self.step == 0 and self.cfg.eval.every:
            self.evaluate()  # the untrained generator: where the metric curves start
        with StopSignals() as stop:
            agreement = StepAgreement()
            while self.step < t.steps:
                batches = self.next_batches()
                self.guard.before_step()
                self.schedules.apply(self.strategy, self.recipe, self.ema, self.images_seen)
                stats = train_step(self.strategy, self.recipe, batches, self.step)
                self.step += 1
                self.images_seen += self.images_per_step
                self.guard.after_step()
                if self.ema is not None:
                    self.ema.update(self.images_seen - self.images_per_step, self.images_per_step)
                last = self.step == t.steps
                signum = self.agree(agreement, stop, last)
                if last:  # before the end-of-run evaluation: a failure there loses no training
                    self.save_checkpoint()
                if self.step % t.log_every == 0 or last or self.step == 1:
                    self.log(stats, meter.tick(self.images_seen))
                    self.logger.scalars(self.step, self.guard.scalars())
                if self.step % t.sample_every == 0 or last:
                    self.sample_grid(self.run_dir / "samples" / f"step{self.step:07d}.png")
                if last or (self.cfg.eval.every and self.step % self.cfg.eval.every == 0):
                    self.evaluate()
                self.logger.advance()
                if last:
                    break
                if signum is not None:
                    return self.stop_for_signal(signum)
                if self.step % t.ckpt_every == 0 and self.guard.streak == 0:
                    self.save_checkpoint()
        self.save_checkpoint()
        self.finish()
        return 0

    # ---- faults and checkpoints -----------------------------------------------------------
    def agree(self, agreement: StepAgreement, stop: StopSignals, last: bool) -> Optional[int]:
        """Hand this step's stop signal and non-finite counters to the ranks' agreement and act
        on the agreed record of the step before (of this step too when it is the last): warn of
        skipped updates, stop after too many in a row. Returns the signal to stop for, if any."""
        # torch.full fills on the device; torch.tensor(x, device=cuda) would copy and wait for the stream
        values = torch.stack([torch.full((), float(stop.code), device=self.device),
                              *[v.float() for v in self.guard.values()]])
        records = [agreement.exchange(self.step, values)]
        if last:
            records.append(agreement.collect())
        signum = None
        for record in records:
            if record is not None:
                signum = self.check_record(*record) or signum
        return signum

    def check_record(self, step: int, values: list[float]) -> Optional[int]:
        """Act on the agreed numbers of `step`: [signal, streak, skipped G, skipped D]."""
        signum, streak, *counts = (int(v) for v in values)
        skipped = [n for n, c in zip(("G", "D"), counts) if c > self.skipped_seen[n]]
        self.skipped_seen = dict(zip(("G", "D"), counts))
        limit = self.cfg.train.max_nonfinite
        if skipped and self.info.is_main:
            warn(f"step {step}: NaN/Inf loss or gradient in the {' and '.join(skipped)} update; "
                 f"skipped on every rank ({streak} step(s) in a row, train.max_nonfinite={limit})")
        if streak >= limit:
            latest = self.ckpt.latest_name()
            raise NonFiniteError(
                f"{streak} consecutive steps (up to step {step}) had NaN/Inf losses or "
                f"gradients (train.max_nonfinite={limit}): stopping. The last good checkpoint is "
                + (f"{str(self.ckpt.root / latest)!r}" if latest else "none (no checkpoint was saved yet)")
                + ". Lower train.lr_g/train.lr_d, try train.precision=fp32, or check the data.")
        return signum or None

    def stop_for_signal(self, signum: int) -> int:
        path = self.save_checkpoint() or self.ckpt.root / self.ckpt.latest_name()
        if self.info.is_main:
            note(f"received {signal_name(signum)}: checkpoint {str(path)!r} holds step {self.step}; exiting "
                 f"with code {EXIT_RETRY}: run the same command again to continue")
        self.write_run_info("interrupted")
        self.logger.close()
        return EXIT_RETRY

    def save_checkpoint(self) -> Optional[Path]:
        """Collective: checkpoint the current step (once). Returns its directory."""
        if self.last_saved_step == self.step:
            return None
        trainer_state = {
            "format": FORMAT, "step": self.step, "images_seen": self.images_seen,
            "world_size": self.info.world_size, "strategy": self.strategy.name, "config": to_dict(self.cfg),
            "guard": self.guard.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "recipe": self.recipe.state_dict(),  # e.g. a penalty's running mean
        }
        rank_state = {
            "rank": self.info.rank, "rng": rng_state(self.device),
            "data": self.data.state_dict(),
            "skipped_updates": dict(self.strategy.skipped_updates),  # as this rank counted them
        }
        exports = {GENERATOR_FILE: self.strategy.full_state_dict("G")}  # collective; rank 0's is full
        path = self.ckpt.save(self.step, self.strategy, trainer_state, rank_state, to_yaml(self.cfg), exports)
        self.last_saved_step = self.step
        return path

    def maybe_resume(self) -> Optional[str]:
        """Continue from this run's newest valid checkpoint, else from train.resume, else start."""
        path = self.ckpt.find(self.cfg.train.resume)
        if path is None:
            return None
        trainer_state, rank_state = self.ckpt.load(path, self.strategy, to_dict(self.cfg))
        self.step = trainer_state["step"]
        self.images_seen = trainer_state["images_seen"]
        self.guard.load_state_dict(trainer_state["guard"])
        self.recipe.load_state_dict(trainer_state.get("recipe") or {})
        if self.ema is not None and trainer_state.get("ema") is not None:
            self.ema.load_state_dict(trainer_state["ema"])
        if path.parent == self.ckpt.root:
            self.last_saved_step = self.step
        if rank_state is not None:
            self.data.load_state_dict(rank_state["data"])
            # last: creating the data iterator draws from the torch RNG
            set_rng_state(rank_state["rng"], self.device)
        if self.info.is_main:
            note(f"resumed from {str(path)!r} at step {self.step} ({self.images_seen} images seen)")
        return str(path)

    def log(self, stats: dict[str, torch.Tensor], img_per_sec: float) -> None:
        keys = sorted(stats)
        values = gdist.all_reduce_mean(torch.stack([stats[k].float() for k in keys])).tolist()
        v = dict(zip(keys, values))
        self.logger.scalars(self.step, {
            **v,  # the recipe's own statistics: losses, penalties, what the loss says of D's logits
            "perf/img_per_sec": img_per_sec,
            "perf/img_per_sec_per_process": img_per_sec / self.info.world_size,
            "progress/kimg": self.images_seen / 1000.0,
            **self.schedules.scalars(),  # the values the last step ran with
        })
        self.data_summary = self.data.global_stats()  # collective, like the reduction above
        self.logger.scalars(self.step, self.data.scalars(self.data_summary))
        try:
            self.data.check(self.data_summary, final=self.step >= self.cfg.train.steps)
        except DataError:
            self.write_run_info("failed: bad data")
            raise

    @torch.no_grad()
    def samples(self, z: torch.Tensor, c: Optional[torch.Tensor] = None) -> torch.Tensor:
        """G(z, c) in eval mode (c: the classes of a conditional model; None: uniform over them,
        drawn from the latents' own generator state). Called on every rank: a sharded G needs all of them.
        Runs in chunks of the training batch, which is known to fit (a 64-image grid at 1024 px
        would not)."""
        G = self.strategy.sample_module("G")
        was_training = G.training
        G.eval()
        if c is None and self.spec.num_classes:
            c = torch.arange(z.shape[0], device=z.device) % self.spec.num_classes
        chunk = max(1, self.cfg.train.batch_size)
        try:
            with self.strategy.autocast():
                return torch.cat([G(z[i:i + chunk], None if c is None else c[i:i + chunk]).float()
                                  for i in range(0, z.shape[0], chunk)])
        finally:
            G.train(was_training)

    def ema_weights(self) -> contextlib.AbstractContextManager:
        """G holds its EMA weights inside the block (ema.enabled), its training weights after."""
        return self.ema.swapped() if self.ema is not None else contextlib.nullcontext()

    def sample_grid(self, path: Path) -> None:
        with self.ema_weights():
            images = self.samples(self.fixed_noise, self.fixed_labels)
        self.logger.images(self.step, "samples", images, path)

    def evaluate(self) -> None:
        """eval.metrics of the EMA generator (FID, KID, IS, precision/recall or the digits metrics),
        every rank generating its share. Collective."""
        if self.evaluator is None:
            return
        self.strategy.sync_buffers()  # every rank's share from the same BatchNorm statistics
        with self.ema_weights():
            result = self.evaluator.run(self.samples, self.device)
            if self.class_eval is not None:
                result = {**result, **self.class_eval.run(self.samples, self.device)}
        result = {"step": self.step, "kimg": self.images_seen / 1000.0, **result}
        self.last_eval = result
        keys = self.evaluator.metric_keys + (["intra_fd", "class_accuracy"] if self.class_eval is not None else [])
        self.logger.scalars(self.step, {f"metrics/{k}": result[k] for k in keys if k in result})
        if self.info.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(result) + "\n")
            self.logger.info("eval: " + " ".join(f"{k}={result[k]:.4g}" if isinstance(result[k], float)
                                                 else f"{k}={result[k]}" for k in ("step", *keys) if k in result))
        if self.cfg.train.keep_best:
            self.keep_if_best(result)
        self.write_run_info("running")

    def keep_if_best(self, result: dict) -> None:
        """train.keep_best: the generator of the lowest FD so far goes to <run.dir>/best/. Collective
        (every rank has the same result and gathers G's full weights)."""
        import math

        from gan_dist.checkpoint import BEST_DIR, best_value, write_best

        key = self.evaluator.fd_key
        value = result.get(key)
        if value is None or not math.isfinite(value):
            return
        previous = gdist.broadcast_object(best_value(self.run_dir, key) if self.info.is_main else None)
        if previous is not None and value >= previous:
            return
        exports = {"generator.pt": self.strategy.full_state_dict("G")}
        if self.ema is not None:
            exports["generator_ema.pt"] = self.ema.full_state_dict()
        if self.info.is_main:
            write_best(self.run_dir, exports, to_yaml(self.cfg), {**result, "metric": key})
            self.logger.info(f"eval: {key}={value:.4g} is the best so far: generator kept in "
                             f"{self.run_dir / BEST_DIR}")

    # ---- outputs --------------------------------------------------------------------------
    def finish(self) -> None:
        self.strategy.sync_buffers()
        outputs = {"generator.pt": self.strategy.full_state_dict("G")}
        if self.ema is not None:
            outputs["generator_ema.pt"] = self.ema.full_state_dict()
        if self.info.is_main:
            for name, state in outputs.items():
                save_torch_atomic(state, self.run_dir / name)
        with self.ema_weights():
            final = self.samples(self.fixed_noise, self.fixed_labels)
        if self.info.is_main:
            save_grid(final, self.run_dir / "samples.png")
        self.write_run_info("finished")
        self.logger.close()

    def write_run_info(self, status: str) -> None:
        if not self.info.is_main:
            return
        elapsed = time.time() - self.started
        info = {
            "status": status,
            "world_size": self.info.world_size,
            "strategy": self.strategy.name,
            "requested_strategy": self.cfg.parallel.strategy,
            "precision": self.strategy.precision.name,
            "device": str(self.device),
            "device_name": (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                            else platform.processor() or platform.machine()),
            "backend": self.info.backend,
            "launcher": self.info.launcher,
            "num_nodes": max(1, self.info.world_size // max(1, self.info.local_world_size)),
            "threads_per_process": torch.get_num_threads(),
            "steps": self.step,
            "images_seen": self.images_seen,
            "resumed_from": self.resumed_from,
            "ema": self.ema is not None,
            "model": self.spec.family,
            "data_shape": self.data_shape,
            "params": self.params,
            "phases": [{"name": p.name, "trains": p.trains, "terms": list(p.terms), "every": p.every}
                       for p in self.recipe.phases],
            "eval": self.last_eval,
            "data": self.data_summary,
            "elapsed_s": round(elapsed, 3),
            "img_per_sec": round(self.images_seen / elapsed, 3) if elapsed > 0 else None,
            "seed": self.cfg.run.seed,
            "argv": sys.argv,
            "versions": package_versions(),
        }
        write_text_atomic(self.run_dir / "run_info.json", json.dumps(info, indent=1))

    def close(self) -> None:
        self.strategy.close()
        if self.data is not None:
            self.data.close()
        self.data = None
