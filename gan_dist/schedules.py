"""Hyperparameters that change over training: a constant, or `{start, end, kimg, shape}`.

    train.lr_g: {start: 2.0e-4, end: 5.0e-5, kimg: 20000, shape: cosine}

moves from `start` to `end` over the first `kimg` thousand images (of all ranks together) and
stays at `end` after; `shape` is `cosine` (the default: half a cosine period, as R3GAN anneals
its lr, beta2, gamma and EMA length) or `linear`. Any of SCHEDULABLE may be given this way.

The value in force is a function of the images seen before the step only. So every rank
computes the same value without communicating, and a resumed run (which restores the image
count) continues the schedule where it stopped. The trainer applies the values before every
step: Adam's lr and beta2 (through `gan_dist.optim.adam_settings`, which keeps the lazy
regularisation's rescaling), the penalties' gammas (`Recipe.gammas`), the EMA's half-life and
ADA's probability (`augment.p`, R3GAN's rising p; null leaves p to ADA's heuristic), and logs
them as `schedule/<key>` (p as `augment/p`).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Optional, Union

SHAPES = ("cosine", "linear")
FIELDS = ("start", "end", "kimg", "shape")

# key -> (whether a value is valid, what valid means)
SCHEDULABLE: dict[str, tuple[Callable[[float], bool], str]] = {
    "train.lr_g": (lambda v: v > 0, "> 0"),
    "train.lr_d": (lambda v: v > 0, "> 0"),
    "train.beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "reg.r1_gamma": (lambda v: v >= 0, ">= 0"),
    "reg.r2_gamma": (lambda v: v >= 0, ">= 0"),
    "ema.half_life_kimg": (lambda v: v >= 0, ">= 0"),
    "augment.p": (lambda v: 0 <= v <= 1, "in [0, 1]"),
}
# keys whose null means something other than a value (augment.p: ADA adjusts p itself)
NULLABLE = {"augment.p": "null: ADA adjusts p toward augment.target"}
# penalties whose gamma is scheduled: the recipe keeps a penalty whose gamma is ever positive
GAMMAS = {"r1": "reg.r1_gamma", "r2": "reg.r2_gamma"}


@dataclass(frozen=True)
class Schedule:
    start: float
    end: float
    kimg: float
    shape: str = "cosine"

    def at(self, nimg: float) -> float:
        """The value after `nimg` images."""
        if self.kimg == 0 or nimg >= self.kimg * 1000:
            return self.end
        t = max(nimg, 0) / (self.kimg * 1000.0)
        w = 0.5 * (1.0 - math.cos(math.pi * t)) if self.shape == "cosine" else t
        return self.start + (self.end - self.start) * w

    @property
    def extremes(self) -> tuple[float, float]:
        """Both shapes move monotonically from start to end: every value lies between these."""
        return self.start, self.end


Value = Union[float, Schedule]


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if dotted in NULLABLE and not hasattr(cfg, part):
            return None  # a config without the section (e.g. a benchmark's): unset
        cfg = getattr(cfg, part)
    return cfg


def parse(key: str, value: Any) -> Optional[Value]:
    """A constant or a Schedule, checked at every point it takes (ConfigError naming `key`);
    None for a key of NULLABLE left unset."""
    from gan_dist.config import ConfigError

    ok, valid = SCHEDULABLE[key]
    example = f"{key}={{start: 1.0e-3, end: 1.0e-4, kimg: 1000, shape: cosine}}"
    if value is None and key in NULLABLE:
        return None
    if _number(value):
        if not ok(value):
            raise ConfigError(f"{key}={value!r} must be {valid}" + (f" (or {NULLABLE[key]})" if key in NULLABLE else ""))
        return float(value)
    if not isinstance(value, dict):
        raise ConfigError(f"{key}={value!r} must be a number or a schedule such as {example}")
    unknown = sorted(set(map(str, value)) - set(FIELDS))
    missing = [f for f in ("start", "end", "kimg") if f not in value]
    if unknown or missing:
        raise ConfigError(f"{key}: a schedule has the fields start, end, kimg and optionally shape "
                          f"({', '.join(SHAPES)}); " + (f"unknown: {', '.join(unknown)}" if unknown else
                                                         f"missing: {', '.join(missing)}"))
    for f in ("start", "end", "kimg"):
        if not _number(value[f]):
            raise ConfigError(f"{key}.{f}={value[f]!r} must be a number")
    shape = value.get("shape", "cosine")
    if shape not in SHAPES:
        raise ConfigError(f"{key}.shape={shape!r} is not one of: {', '.join(SHAPES)}")
    if value["kimg"] < 0:
        raise ConfigError(f"{key}.kimg={value['kimg']!r} must be >= 0 (the schedule's length in thousands of images)")
    schedule = Schedule(float(value["start"]), float(value["end"]), float(value["kimg"]), shape)
    for f, v in zip(("start", "end"), schedule.extremes):
        if not ok(v):
            raise ConfigError(f"{key}.{f}={v!r}: {key} must be {valid} at every point of its schedule")
    return schedule


def value_at(value: Optional[Value], nimg: float) -> Optional[float]:
    return value.at(nimg) if isinstance(value, Schedule) else value


def validate(cfg: Any) -> None:
    """Every schedulable key of `cfg` is a valid constant or schedule (ConfigError naming the key)."""
    for key in SCHEDULABLE:
        parse(key, _get(cfg, key))


def initial(cfg: Any) -> Any:
    """A copy of `cfg` with plain numbers, for what is built once (the recipe, the optimizers,
    the EMA): the values at the start, except that a penalty whose gamma is positive at any
    point of its schedule keeps a positive gamma, so that the recipe has its phase."""
    out = copy.deepcopy(cfg)
    for key in SCHEDULABLE:
        value = parse(key, _get(cfg, key))
        v = value_at(value, 0)
        if key in GAMMAS.values() and isinstance(value, Schedule) and v == 0:
            v = max(value.extremes)
        section, name = key.split(".")
        if hasattr(out, section):
            setattr(getattr(out, section), name, v)
    return out


class Schedules:
    """The schedulable values of a run config, applied before each step."""

    def __init__(self, cfg: Any) -> None:
        self.values = {key: parse(key, _get(cfg, key)) for key in SCHEDULABLE}
        self.beta1 = float(cfg.train.beta1)
        self.in_force: dict[str, float] = {}
        self.initial = initial(cfg)
        # a constant augment.p is ADA's fixed p from the start; only a schedule is set per step
        self.p_scheduled = isinstance(self.values["augment.p"], Schedule)

    def at(self, nimg: float) -> dict[str, float]:
        return {key: value_at(v, nimg) for key, v in self.values.items()}

    def apply(self, strategy: Any, recipe: Any, ema: Optional[Any], nimg: int) -> dict[str, float]:
        """Set the values in force after `nimg` images: each model's Adam lr and betas (rescaled
        for lazy regularisation), the recipe's gammas, the EMA's half-life. Same on every rank."""
        from gan_dist.optim import adam_settings

        v = self.at(nimg)
        train = SimpleNamespace(lr_g=v["train.lr_g"], lr_d=v["train.lr_d"], beta1=self.beta1, beta2=v["train.beta2"])
        for name, opt in strategy.optimizers.items():
            settings = adam_settings(train, name, recipe.reg_interval(name))
            inner = getattr(opt, "optimizer", opt)  # DeepSpeed's optimizers wrap torch's
            for group in inner.param_groups:
                group["lr"], group["betas"] = settings["lr"], settings["betas"]
        for penalty, key in GAMMAS.items():
            if penalty in recipe.gammas:
                recipe.gammas[penalty] = v[key]
        if ema is not None:
            ema.half_life_kimg = v["ema.half_life_kimg"]
        if self.p_scheduled and recipe.augment is not None:
            recipe.augment.set_p(v["augment.p"])  # ADA's p, when given as a schedule
        self.in_force = v
        return v

    def scalars(self) -> dict[str, float]:
        """The values of the last `apply`, named for TensorBoard (augment.p is logged by the
        augmentation itself, as `augment/p`, whether fixed, scheduled or adapted)."""
        return {f"schedule/{key}": value for key, value in self.in_force.items()
                if value is not None and key != "augment.p"}


__all__ = ["SCHEDULABLE", "SHAPES", "Schedule", "Schedules", "initial", "parse", "validate", "value_at"]
