"""What a model family tells the rest of gan_dist, and nothing about distribution.

A family (a folder under `gan_dist/models/`) registers a `ModelSpec` factory: given the `model`
config section it says how to build and initialise G and D, which sub-modules are worth
sharding on their own (FSDP units), and the sizes of the latent and the label. Every family's
networks share one call signature, `G(z, c)` and `D(x, c)`, with `c` a tensor of class
indices or None; an unconditional family ignores it. G has a `z_dim` attribute (its latent size),
so that a generator loaded from a run samples without its config.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    family: str
    z_dim: int  # the latent G draws from N(0, I)
    num_classes: int  # 0: unconditional
    channels: int
    resolution: int
    make_generator: Callable[[], nn.Module]
    make_discriminator: Callable[[], nn.Module]
    init: Callable[[nn.Module], None]  # in place, drawing from torch's global RNG
    # sub-modules of G or D that become their own FSDP unit (one block's full parameters at a time)
    shard_units: Callable[[nn.Module], list[nn.Module]]
    # rejects settings the family cannot build, naming the config key (ConfigError)
    check: Callable[[Any], None] = lambda model_cfg: None
    # per-sample random inputs of G besides z (style mixing, noise inputs): keyword arguments of
    # G's forward, drawn as a function of (seed, global sample indices) only (gan_dist.rng)
    draw_g_inputs: Callable[[int, Sequence[int], Any], dict[str, Any]] = lambda seed, indices, device: {}
    # the family's own phases (e.g. StyleGAN2's Greg with path length), from the run config:
    # [(Phase, {term name: Term})]; a Term is called as term(strategy, batch) -> (loss, stats)
    extra_phases: Callable[[Any], list] = field(default=lambda cfg: [])
    # the shard units whose forward may run twice (activation checkpointing recomputes it in the
    # backward): none with side effects besides BatchNorm statistics; None: every shard unit
    recompute_units: Optional[Callable[[nn.Module], list[nn.Module]]] = None

    def checkpoint_units(self, module: nn.Module) -> list[nn.Module]:
        """The sub-modules of G or D that train.activation_checkpointing recomputes."""
        return (self.recompute_units or self.shard_units)(module)

    def build(self, seed: int) -> tuple[nn.Module, nn.Module]:
        """G and D with weights drawn from `seed`, identical on every rank, the caller's RNG untouched."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            G, D = self.make_generator(), self.make_discriminator()
            self.init(G)
            self.init(D)
        return G, D

    def param_counts(self, G: nn.Module, D: nn.Module) -> dict[str, int]:
        return {"G": sum(p.numel() for p in G.parameters()), "D": sum(p.numel() for p in D.parameters())}
