"""DCGAN (Radford et al. 2015), as in the PyTorch DCGAN example: the `model.arch=dcgan` family.
Conditional when model.num_classes > 0: a class embedding into G's input, a projection D."""
from __future__ import annotations

from typing import Any

from torch import nn

from gan_dist.models.dcgan.networks import Discriminator, Generator, dcgan_init_
from gan_dist.models.spec import ModelSpec

RESOLUTIONS = (32, 64)


def _blocks(module: nn.Module) -> list[nn.Module]:
    return list(module.blocks)


def check(model_cfg: Any) -> None:
    from gan_dist.config import ConfigError

    if model_cfg.resolution not in RESOLUTIONS:
        raise ConfigError(f"model.resolution={model_cfg.resolution!r}: model.arch=dcgan supports "
                          f"{', '.join(map(str, RESOLUTIONS))}")
    k = model_cfg.num_classes
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ConfigError(f"model.num_classes={k!r} must be an integer >= 0 once the data is known "
                          "(0: unconditional)")


def spec(model_cfg: Any) -> ModelSpec:
    d = model_cfg.dcgan
    C, R, K = model_cfg.channels, model_cfg.resolution, model_cfg.num_classes
    return ModelSpec(
        family="dcgan", z_dim=d.nz, num_classes=K, channels=C, resolution=R,
        make_generator=lambda: Generator(d.nz, d.ngf, C, R, d.norm, K),
        make_discriminator=lambda: Discriminator(d.ndf, C, R, d.norm, K),
        init=dcgan_init_, shard_units=_blocks, check=check)


__all__ = ["Generator", "Discriminator", "dcgan_init_", "spec"]
