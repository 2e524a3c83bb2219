"""Model families. Each builder takes the `model` config section; nothing here knows about
distribution."""
from __future__ import annotations

import torch
from torch import nn

from gan_dist.models.dcgan import Discriminator, Generator, dcgan_init_


def build_models(model_cfg, seed: int) -> tuple[nn.Module, nn.Module]:
    """G and D with weights drawn from `seed`, identical on every rank."""
    if model_cfg.arch != "dcgan":
        raise ValueError(f"model.arch={model_cfg.arch!r} is not a known architecture (dcgan)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        G = Generator(model_cfg.nz, model_cfg.ngf, model_cfg.channels, model_cfg.resolution, model_cfg.norm)
        D = Discriminator(model_cfg.ndf, model_cfg.channels, model_cfg.resolution, model_cfg.norm)
        dcgan_init_(G)
        dcgan_init_(D)
    return G, D


def build_generator(model_cfg) -> nn.Module:
    """An uninitialised G of the configured shape, e.g. to load generator.pt into."""
    return Generator(model_cfg.nz, model_cfg.ngf, model_cfg.channels, model_cfg.resolution, model_cfg.norm)


__all__ = ["Generator", "Discriminator", "dcgan_init_", "build_models", "build_generator"]
