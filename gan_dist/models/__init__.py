"""Model families, one folder each; `model.arch` picks one. Nothing here knows about
distribution, and nothing outside this package names a family."""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from gan_dist.models import dcgan
from gan_dist.models import stylegan2
from gan_dist.models import r3gan
from gan_dist.models.spec import ModelSpec

FAMILIES: dict[str, Callable[[Any], ModelSpec]] = {"dcgan": dcgan.spec, "r3gan": r3gan.spec}

FAMILIES["stylegan2"] = stylegan2.spec


def model_spec(model_cfg: Any) -> ModelSpec:
    """The spec of `model.arch`, after the family has checked its settings (ConfigError)."""
    if model_cfg.arch not in FAMILIES:
        from gan_dist.config import ConfigError
        raise ConfigError(f"model.arch={model_cfg.arch!r} is not one of: {', '.join(FAMILIES)}")
    spec = FAMILIES[model_cfg.arch](model_cfg)
    spec.check(model_cfg)
    return spec


def build_models(model_cfg: Any, seed: int) -> tuple[nn.Module, nn.Module]:
    """G and D with weights drawn from `seed`, identical on every rank."""
    return model_spec(model_cfg).build(seed)


def build_generator(model_cfg: Any) -> nn.Module:
    """An uninitialised G of the configured shape, e.g. to load generator.pt into."""
    return model_spec(model_cfg).make_generator()


__all__ = ["FAMILIES", "ModelSpec", "model_spec", "build_models", "build_generator"]
