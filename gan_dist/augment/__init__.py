"""Differentiable augmentation of everything D sees: DiffAugment (Zhao et al. 2020) and ADA
(Karras et al. 2020), `augment.kind`.

The loop calls D through `Augment.wrap`, in every D call of every phase (Dmain, Dreg, Gmain),
on real and fake images alike, so G learns through the augmentation and D never sees an
un-augmented image. The gradient penalties differentiate with respect to the images before
augmentation (as StyleGAN2-ADA does): the wrapper augments inside D's input, and the input
the penalty asks about is the one handed to the wrapper.

Each call's per-sample parameters are a function of (run.seed, step, call, global sample
index) (`draws.py`): the call is the phase and the position of the D call within it, so the
real and the fake images of a phase, and the phases of a step, get independent draws.

ADA's probability p starts at `augment.p_init` and every `augment.interval` steps moves by
sign(r_t - target) * (real images seen) / (augment.kimg * 1000), clamped to [0, 1], with
r_t = E[sign(D(x_real))] over the Dmain real logits of the interval on all ranks (one
all-reduce of two numbers), so every rank holds the same p. p lives on the device and nothing
here waits for the host. `augment.p` fixes p instead, or moves it on a schedule over the images
seen (`{start, end, kimg, shape}`, gan_dist/schedules.py: R3GAN's rising p), set before each
step. p and the running sums are checkpointed with the run (the recipe's state) and restored
bitwise.
"""
from __future__ import annotations

import zlib
from typing import Any, Callable, Optional, Sequence

import torch

from gan_dist.augment.ada import N_NORMAL, N_UNIFORM, PIPELINES, ada_augment, ops_of
from gan_dist.augment.diffaugment import TRANSFORMS, diffaugment, uniforms_needed
from gan_dist.augment.draws import draws

KINDS = ("none", "diffaugment", "ada")


def _error(msg: str) -> Exception:
    from gan_dist.config import ConfigError
    return ConfigError(msg)


def validate(aug_cfg: Any) -> None:
    """Reject an unknown augmentation or a setting out of range, naming the key (ConfigError)."""
    if aug_cfg.kind not in KINDS:
        raise _error(f"augment.kind={aug_cfg.kind!r} is not one of: {', '.join(KINDS)}")
    names = [n.strip() for n in str(aug_cfg.policy).split(",") if n.strip()]
    unknown = [n for n in names if n not in TRANSFORMS]
    if unknown or not names:
        raise _error(f"augment.policy={aug_cfg.policy!r}: unknown augmentation {', '.join(unknown) or '(none given)'}; "
                     f"use a comma-separated list of: {', '.join(TRANSFORMS)}")
    bad = [ch for ch in str(aug_cfg.pipeline) if ch not in PIPELINES]
    if bad or not aug_cfg.pipeline:
        raise _error(f"augment.pipeline={aug_cfg.pipeline!r}: unknown part {''.join(bad) or '(none given)'}; "
                     "combine b (x-flip, 90-degree rotations, integer translation), g (scaling, rotation, "
                     "fractional translation), c (colour) and o (cutout), e.g. bgc")
    ops = [op for letter in PIPELINES for op in PIPELINES[letter]]
    for op, scale in dict(aug_cfg.p_scale or {}).items():
        if op not in ops:
            raise _error(f"augment.p_scale.{op}: not an ADA op; the ops are: {', '.join(ops)}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale < 0:
            raise _error(f"augment.p_scale.{op}={scale!r} must be a number >= 0 (the op's probability is p x it)")
    if not 0 < aug_cfg.target < 1:
        raise _error(f"augment.target={aug_cfg.target!r} must be in (0, 1) (ADA's wanted E[sign(D(x_real))], e.g. 0.6)")
    if not 0 <= aug_cfg.p_init <= 1:
        raise _error(f"augment.p_init={aug_cfg.p_init!r} must be in [0, 1]")
    if aug_cfg.interval <= 0:
        raise _error(f"augment.interval={aug_cfg.interval!r} must be a positive integer")
    if not aug_cfg.kimg > 0:
        raise _error(f"augment.kimg={aug_cfg.kimg!r} must be > 0")


def call_key(phase: str, position: int) -> int:
    """A stable number for the `position`-th D call of `phase` (a seed component)."""
    return zlib.crc32(f"{phase}:{position}".encode())


class Augment:
    """An augmentation of D's inputs; subclasses say how one call transforms its images."""

    kind = "none"

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def apply(self, x: torch.Tensor, step: int, call: int, index: Sequence[int]) -> torch.Tensor:
        raise NotImplementedError

    def wrap(self, D: Callable, step: int, phase: str, index: Sequence[int]) -> Callable:
        """D as the phase sees it: each call augments its images first, with draws of its own.

        The augmentation runs outside autocast, in float32 (cast back to the images' dtype):
        the same arithmetic whatever train.precision, for real and fake images alike, and no
        bf16 rounding of ADA's filter taps and resampling products."""
        calls = [0]

        def augmented(x: torch.Tensor, c: Optional[torch.Tensor] = None) -> torch.Tensor:
            idx = index if len(index) == x.shape[0] else range(x.shape[0])
            key = call_key(phase, calls[0])
            calls[0] += 1
            with torch.autocast(x.device.type, enabled=False):
                x = self.apply(x, step, key, idx)
            return D(x, c)
        return augmented

    def observe(self, real_logits: torch.Tensor) -> None:
        """Dmain's logits of the real images (ADA's overfitting heuristic)."""

    def end_step(self, step: int) -> dict[str, torch.Tensor]:
        """After iteration `step` (0-based) on every rank; returns statistics to log."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class DiffAugment(Augment):
    kind = "diffaugment"

    def __init__(self, seed: int, policy: Sequence[str]) -> None:
        super().__init__(seed)
        self.policy = tuple(policy)
        self.n_uniform = uniforms_needed(self.policy)

    def apply(self, x, step, call, index):
        u, _ = draws(self.seed, step, call, index, self.n_uniform, 0, x.device)
        return diffaugment(x, u, self.policy)


class ADA(Augment):
    kind = "ada"

    def __init__(self, seed: int, pipeline: str, p: Optional[float], target: float, interval: int,
                 kimg: float, p_init: float, p_scale: Optional[dict[str, float]] = None) -> None:
        super().__init__(seed)
        self.ops = ops_of(pipeline)
        self.scales = {op: float(v) for op, v in (p_scale or {}).items()}
        self.fixed = p is not None
        self.target, self.interval, self.kimg = target, interval, kimg
        self.p = torch.tensor(float(p if p is not None else p_init))
        # running sums since the last adjustment: sum of sign(D(x_real)), number of real images
        self.signs = torch.zeros(2)
        self.r_t = torch.tensor(float("nan"))  # the last interval's heuristic, for the log

    def set_p(self, p: float) -> None:
        """A fixed p moved by a schedule (the same value on every rank, from the image count)."""
        self.p = torch.full_like(self.p, float(p))  # a fill on the device: no host-to-device copy

    def _on(self, device: torch.device) -> None:
        if self.p.device != device:
            self.p, self.signs, self.r_t = self.p.to(device), self.signs.to(device), self.r_t.to(device)

    def apply(self, x, step, call, index):
        self._on(x.device)
        u, n = draws(self.seed, step, call, index, N_UNIFORM, N_NORMAL, x.device)
        return ada_augment(x, u, n, self.p, self.ops, self.scales)

    def observe(self, real_logits):
        if self.fixed:
            return
        logits = real_logits.detach().float()
        self._on(logits.device)
        self.signs = self.signs + torch.stack([logits.sign().sum(), torch.tensor(float(logits.numel()),
                                                                                 device=logits.device)])

    def end_step(self, step):
        if self.fixed:  # fixed or scheduled: no heuristic to report
            return {"augment/p": self.p}
        if (step + 1) % self.interval == 0:
            from gan_dist.distributed import all_reduce_mean, world_size

            total = all_reduce_mean(self.signs)  # the same scale for both: their ratio is the global mean
            self.r_t = total[0] / total[1].clamp(min=1)
            adjust = torch.sign(self.r_t - self.target) * (total[1] * world_size()) / (self.kimg * 1000)
            self.p = (self.p + adjust).clamp(0.0, 1.0)
            self.signs = torch.zeros_like(self.signs)
        return {"augment/p": self.p, "augment/r_t": self.r_t}

    def state_dict(self):
        return {"p": self.p.detach().cpu().clone(), "signs": self.signs.detach().cpu().clone(),
                "r_t": self.r_t.detach().cpu().clone()}

    def load_state_dict(self, state):
        device = self.p.device
        self.p, self.signs = state["p"].clone().to(device), state["signs"].clone().to(device)
        self.r_t = state.get("r_t", torch.tensor(float("nan"))).clone().to(device)


def build_augment(cfg: Any) -> Optional[Augment]:
    """The run's augmentation (None for augment.kind=none)."""
    a = cfg.augment
    if a.kind == "none":
        return None
    if a.kind == "diffaugment":
        return DiffAugment(cfg.run.seed, [n.strip() for n in a.policy.split(",") if n.strip()])
    from gan_dist.schedules import parse, value_at
    p = value_at(parse("augment.p", a.p), 0)  # a schedule starts at its start; the trainer moves it
    return ADA(cfg.run.seed, a.pipeline, p, a.target, a.interval, a.kimg, a.p_init, dict(a.p_scale or {}))


__all__ = ["ADA", "Augment", "DiffAugment", "KINDS", "build_augment", "call_key", "validate"]
