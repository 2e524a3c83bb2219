"""DCGAN (Radford et al. 2015), as in the PyTorch DCGAN example: the `model.arch=dcgan` family."""
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
    if model_cfg.num_classes:
        raise ConfigError(f"model.num_classes={model_cfg.num_classes}: model.arch=dcgan is unconditional "
                          "(set model.num_classes=0)")


def spec(model_cfg: Any) -> ModelSpec:
    d = model_cfg.dcgan
    C, R = model_cfg.channels, model_cfg.resolution
    return ModelSpec(
        family="dcgan", z_dim=d.nz, num_classes=0, channels=C, resolution=R,
        make_generator=lambda: Generator(d.nz, d.ngf, C, R, d.norm),
        make_discriminator=lambda: Discriminator(d.ndf, C, R, d.norm),
        init=dcgan_init_, shard_units=_blocks, check=check)


__all__ = ["Generator", "Discriminator", "dcgan_init_", "spec"]
