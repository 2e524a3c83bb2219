"""One training iteration: the recipe's due phases, in order (docs/recipes.md).

    Dmain  (train.d_steps times)  D(x), D(G(z).detach()) [+ R1/R2]  -> one backward -> step D
    Dreg   (every reg.d_every)    R1/R2 x d_every                    -> one backward -> step D
    Gmain                         D frozen, D(G(z))                  -> one backward -> step G

The strategy decides how gradients travel between ranks; this file only says what each phase
computes and when an update ends. With an augmentation (`recipe.augment`) every D call of a
phase goes through it, real and fake images alike. Each model's gradients are reduced once per update, on the
last micro-batch, and a phase that trains G computes no gradient of D.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from gan_dist.parallel.base import Strategy
from gan_dist.recipe import Phase, Recipe, squared_grad_norm


@dataclass
class Batch:
    """One micro-batch of one rank: real images and their labels, the latents and labels of
    the fakes (labels None for an unconditional model), and the family's other per-sample
    inputs of G (`ModelSpec.draw_g_inputs`), passed to G as keyword arguments. `index`: the
    samples' global indices (what the augmentation's per-sample draws are keyed by)."""
    real: torch.Tensor
    z: torch.Tensor
    real_c: Optional[torch.Tensor] = None
    fake_c: Optional[torch.Tensor] = None
    g_inputs: dict[str, Any] = field(default_factory=dict)
    index: Sequence[int] = ()

    def fake(self, G: Any) -> torch.Tensor:
        return G(self.z, self.fake_c, **self.g_inputs)


def d_terms(strategy: Strategy, recipe: Recipe, phase: Phase, b: Batch,
            fake: Optional[torch.Tensor], D: Any = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of a D phase on one micro-batch: the adversarial term and/or the penalties.

    One forward of D per input: a penalised input requires grad, and the adversarial term
    reads the same logits. A penalty-only phase adds `logits * 0` so that every parameter of D
    takes part in the backward (DDP waits for all of them). `D`: D as the phase calls it
    (behind the augmentation); the penalties differentiate w.r.t. the images handed to it."""
    D, terms = D or strategy.D, phase.terms
    real = b.real.detach().requires_grad_("r1" in terms)
    real_logits = D(real, b.real_c) if "adv" in terms or "r1" in terms else None
    fake_logits = None
    if "adv" in terms or "r2" in terms:
        fake = fake.detach().requires_grad_("r2" in terms)
        fake_logits = D(fake, b.fake_c)
    if "adv" in terms:
        if phase.name == "Dmain" and recipe.augment is not None:
            recipe.augment.observe(real_logits)  # ADA's overfitting heuristic
        loss, stats = recipe.loss.d_loss(real_logits, fake_logits)
        stats["loss/D"] = loss.detach()
    else:
        loss = sum(l.float().sum() for l in (real_logits, fake_logits) if l is not None) * 0.0
        stats = {}
    for name, inputs, logits in (("r1", real, real_logits), ("r2", fake, fake_logits)):
        if name in terms:
            penalty = recipe.gammas[name] / 2 * squared_grad_norm(strategy, logits, inputs)
            loss = loss + penalty * phase.weight
            stats[f"loss/{name}"] = penalty.detach()
    return loss, stats


def train_step(strategy: Strategy, recipe: Recipe, batches: Sequence[Sequence[Batch]],
               step: int = 0) -> dict[str, torch.Tensor]:
    """One iteration (0-based `step`) over len(batches) D updates of len(batches[0]) micro-batches.

    The G forward of the last D update is reused by the G update (one G forward per iteration,
    as in the DCGAN example). With gradient accumulation the fakes are generated again in the
    G phase instead: keeping every micro-batch's graph alive would cost what accumulation
    exists to save. Returns detached scalar tensors named for TensorBoard (the last D update's
    statistics); nothing here syncs the host.
    """
    G, D = strategy.G, strategy.D
    n_micro = len(batches[0])
    reuse_fake = n_micro == 1
    stats: dict[str, torch.Tensor] = {}
    fake = None

    def record(values: dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            stats[k] = stats.get(k, 0.0) + v.float() / n_micro

    for phase in recipe.due(step):
        updates = batches if phase.name == "Dmain" else batches[-1:]
        for u, micro_batches in enumerate(updates):
            last = u == len(updates) - 1
            for i, b in enumerate(micro_batches):
                D = strategy.D if recipe.augment is None else recipe.augment.wrap(strategy.D, step, phase.name, b.index)
                with strategy.phase(phase.trains, sync=i == n_micro - 1, double_backward=phase.double_backward):
                    with strategy.autocast():
                        if phase.trains == "D":
                            needs_fake = "adv" in phase.terms or "r2" in phase.terms
                            if needs_fake and (phase.name == "Dmain" or fake is None or not reuse_fake):
                                # (1) the fakes of a D update; kept with their graph for Gmain
                                with torch.set_grad_enabled(phase.name == "Dmain" and last and reuse_fake):
                                    fake = b.fake(G)
                            loss, values = d_terms(strategy, recipe, phase, b, fake, D)
                        elif "adv" in phase.terms:
                            # (2) the G update: D frozen, no gradient of D computed or reduced
                            if not reuse_fake:
                                fake = b.fake(G)
                            real_logits = D(b.real, b.real_c) if recipe.loss.g_needs_real else None
                            loss, values = recipe.loss.g_loss(D(fake, b.fake_c), real_logits)
                            values["loss/G"] = loss.detach()
                        else:
                            # a family's own G terms (Greg), lazy: weighted by the interval
                            loss, values = 0.0, {}
                            for name in phase.terms:
                                term_loss, term_values = recipe.terms[name](strategy, b)
                                loss, values = loss + term_loss * phase.weight, {**values, **term_values}
                    strategy.backward(loss / n_micro, phase.trains)
                if last:
                    record(values)
            strategy.step(phase.trains)
    if recipe.augment is not None:
        stats.update(recipe.augment.end_step(step))  # ADA: p adjusted every augment.interval steps
    return stats
