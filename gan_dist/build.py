"""From a config to a strategy holding G and D with their optimizers: the one path the trainer,
the benchmarks and the tests take."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import torch

from gan_dist import rng
from gan_dist.loop import Batch
from gan_dist.models import ModelSpec, model_spec
from gan_dist.optim import OptimizerFactory, optimizer_factory
from gan_dist.recipe import Recipe, build_recipe


def setup_models(strategy: Any, cfg: Any, seed: Optional[int] = None,
                 make_optimizer: Optional[OptimizerFactory] = None) -> tuple[Recipe, ModelSpec, dict[str, int]]:
    """Build the configured family's G and D (weights from `seed`, default run.seed), hand them
    to `strategy` with the recipe's optimizers, and return (recipe, spec, parameter counts)."""
    from gan_dist.schedules import initial

    cfg = initial(cfg)  # scheduled values (lr, gammas, ...) at their start: what is built once
    spec = model_spec(cfg.model)
    recipe = build_recipe(cfg, spec)
    G, D = spec.build(cfg.run.seed if seed is None else seed)
    counts = spec.param_counts(G, D)
    strategy.setup(G, D, make_optimizer or optimizer_factory(cfg.train, recipe), spec.shard_units,
                   spec.checkpoint_units)
    return recipe, spec, counts


def fake_labels(seed: int, num_classes: int, index: Sequence[int], device: torch.device,
                class_counts: Optional[Sequence[int]] = None) -> torch.Tensor:
    """The class of each fake, a function of (seed, global sample index): uniform over the
    classes, or with `class_counts` (train.fake_labels=data) drawn with the data's frequencies."""
    if class_counts is None:
        return rng.randint_by_index(seed, rng.FAKE_LABELS, index, num_classes, device)
    cumulative = torch.tensor(list(class_counts), dtype=torch.long).cumsum(0)
    sample = rng.randint_by_index(seed, rng.FAKE_LABELS, index, int(cumulative[-1]))  # one of the data's samples
    return torch.searchsorted(cumulative, sample, right=True).to(device, non_blocking=True)


RealBatch = Union[torch.Tensor, tuple[torch.Tensor, Optional[torch.Tensor]]]


def step_batches(cfg: Any, spec: ModelSpec, step: int, rank: int, world_size: int,
                 next_real: Callable[[], RealBatch], device: torch.device,
                 class_counts: Optional[Sequence[int]] = None) -> list[list[Batch]]:
    """One rank's micro-batches of iteration `step` (0-based): [D update][micro-batch].

    The latent of each fake is a function of (run.seed, global sample index) only (gan_dist.rng):
    within an update, sample k of micro-batch m of rank r has position (r * accum + m) * b + k,
    so N processes with batch b draw the latents that one process with batch N * b draws; so is
    the class of each fake of a conditional model (`fake_labels`). `next_real` gives the real
    images, or (images, labels) for a conditional model."""
    t = cfg.train
    b = t.batch_size
    per_update = b * t.grad_accum * world_size
    out = []
    for j in range(t.d_steps):
        base = (step * t.d_steps + j) * per_update
        micro = []
        for m in range(t.grad_accum):
            lo = base + (rank * t.grad_accum + m) * b
            index = range(lo, lo + b)
            z = rng.randn_by_index(cfg.run.seed, rng.Z, index, (spec.z_dim,), device)
            real = next_real()
            real, real_c = real if isinstance(real, tuple) else (real, None)
            fake_c = (fake_labels(cfg.run.seed, spec.num_classes, index, device, class_counts)
                      if spec.num_classes else None)
            micro.append(Batch(real=real, z=z, real_c=real_c if spec.num_classes else None, fake_c=fake_c,
                               g_inputs=spec.draw_g_inputs(cfg.run.seed, index, device), index=index))
        out.append(micro)
    return out
