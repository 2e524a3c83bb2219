"""A training recipe: the adversarial loss, the penalties, and the phase schedule.

An iteration is a list of phases, each naming the model it trains, the loss terms of its one
backward, and how often it runs (as in StyleGAN2-ADA's Gmain/Greg/Dmain/Dreg):

    Dmain   trains D   adv [+ r1, r2 when reg.d_every == 1]   every step, train.d_steps times
    Dreg    trains D   r1, r2 (x d_every)                      every reg.d_every steps (lazy)
    Gmain   trains G   adv                                     every step
    Greg    trains G   a family's own terms (StyleGAN2: path length), from ModelSpec.extra_phases

Lazy regularisation (Karras et al. 2020): a penalty computed every k steps is multiplied by k,
and the optimizer of the model it regularises gets lr * k/(k+1) and betas ** (k/(k+1)) so that
its effective step size matches a penalty applied every step (`gan_dist.optim`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gan_dist.recipe.losses import LOSSES, Loss, build_loss
from gan_dist.recipe.penalties import PENALTIES, squared_grad_norm


@dataclass(frozen=True)
class Phase:
    name: str  # Dmain | Dreg | Gmain | Greg
    trains: str  # "D" or "G"
    terms: tuple[str, ...]  # "adv" and/or penalties ("r1", "r2")
    every: int = 1  # due at the steps (0-based) divisible by this
    weight: float = 1.0  # multiplies the penalty terms: the interval, for lazy regularisation
    # a family's own term that differentiates an input gradient of the trained model (path length)
    second_order: bool = False

    @property
    def double_backward(self) -> bool:
        """Whether the phase differentiates an input gradient of the model it trains (a penalty)."""
        return self.second_order or any(t in PENALTIES for t in self.terms)

    def due(self, step: int) -> bool:
        return step % self.every == 0


@dataclass(frozen=True)
class Recipe:
    loss: Loss
    phases: tuple[Phase, ...]
    gammas: dict[str, float] = field(default_factory=dict)  # penalty -> gamma
    # a family's own loss terms by name, called as term(strategy, batch) -> (loss, stats); a term
    # with state (a running mean) has state_dict/load_state_dict and is checkpointed with the run
    terms: dict[str, Any] = field(default_factory=dict)
    # what every image D sees goes through (gan_dist.augment, augment.kind); None: nothing
    augment: Any = None

    def state_dict(self) -> dict[str, Any]:
        state = {n: t.state_dict() for n, t in self.terms.items() if hasattr(t, "state_dict")}
        if self.augment is not None:
            state["augment"] = self.augment.state_dict()  # ADA's p
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for n, t in self.terms.items():
            if hasattr(t, "load_state_dict") and n in state:
                t.load_state_dict(state[n])
        if self.augment is not None and "augment" in state:
            self.augment.load_state_dict(state["augment"])

    def due(self, step: int) -> list[Phase]:
        return [p for p in self.phases if p.due(step)]

    def reg_interval(self, model: str) -> int:
        """k of the lazy phase that regularises `model` (1: none, or every step)."""
        return max([p.every for p in self.phases if p.trains == model and p.name.endswith("reg")], default=1)


def build_recipe(cfg: Any, spec: Any = None) -> Recipe:
    """The recipe of a run config: train.loss, the reg section, and the model family's own
    phases (`ModelSpec.extra_phases`, e.g. StyleGAN2's path length)."""
    gammas = {name: g for name, g in (("r1", cfg.reg.r1_gamma), ("r2", cfg.reg.r2_gamma)) if g > 0}
    penalties = tuple(gammas)
    k = cfg.reg.d_every
    lazy = k > 1 and bool(penalties)
    phases = [Phase("Dmain", "D", ("adv",) + (() if lazy else penalties))]
    if lazy:
        phases.append(Phase("Dreg", "D", penalties, every=k, weight=float(k)))
    phases.append(Phase("Gmain", "G", ("adv",)))
    terms: dict[str, Any] = {}
    for phase, phase_terms in (spec.extra_phases(cfg) if spec is not None else []):
        phases.append(phase)
        terms.update(phase_terms)
    from gan_dist.augment import build_augment
    augment = build_augment(cfg) if hasattr(cfg, "augment") else None
    return Recipe(build_loss(cfg.train.loss), tuple(phases), gammas, terms, augment)


__all__ = ["LOSSES", "Loss", "PENALTIES", "Phase", "Recipe", "build_loss", "build_recipe", "squared_grad_norm"]
