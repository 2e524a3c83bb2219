"""R3GAN (Huang et al. 2024, "The GAN is dead; long live the GAN!"): the `model.arch=r3gan` family.

A preset (`model.r3gan.preset`) gives the widths, blocks and cardinalities of the paper's
runs; `model.r3gan.widths`, `.blocks`, `.cardinalities`, `.expansion` and `.z_dim` override
it. Lists are G's, per stage from 4x4 upwards; D uses them reversed. FSDP shards each stage.

`model.r3gan.bf16_stages` (N, or `preset`: the reference's count for the preset) runs G's last
N and D's first N stages, the high resolutions, in bfloat16 with fp32 master weights, as the
reference's `FP16Stages` do; it is the mixed precision of a train.precision=fp32 run, where
bf16/fp16 autocast already computes every stage in reduced precision (`check_config`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from gan_dist.models.r3gan.networks import Discriminator, Generator, r3gan_init_
from gan_dist.models.spec import ModelSpec


@dataclass(frozen=True)
class Preset:
    widths: tuple[int, ...]
    cardinalities: tuple[int, ...]
    blocks: tuple[int, ...]
    expansion: int = 2
    z_dim: int = 64
    bf16_stages: int = 0  # the reference's FP16Stages count (model.r3gan.bf16_stages=preset)

    @property
    def resolution(self) -> int:
        return 4 * 2 ** (len(self.widths) - 1)


def _preset(widths: list[int], cardinalities: list[int], **kw: Any) -> Preset:
    return Preset(tuple(widths), tuple(cardinalities), (2,) * len(widths), **kw)


# the widths of the paper's runs (brownvc/R3GAN train.py): 3/4 (CIFAR-10, FFHQ) or 6/4 (ImageNet)
# of 1024 per stage, halving towards high resolutions, 2 blocks per stage, 96 groups at full width;
# the number of highest-resolution stages it computes in bf16 (its FP16Stages, 3 or 4 per net)
PRESETS: dict[str, Preset] = {
    "cifar10": _preset([768] * 4, [96] * 4, bf16_stages=3),
    "ffhq64": _preset([768] * 4 + [384], [96] * 4 + [48], bf16_stages=4),
    "ffhq256": _preset([768] * 4 + [384, 192, 96], [96] * 4 + [48, 24, 12], bf16_stages=4),
    "imagenet32": _preset([1536] * 4, [96] * 4, bf16_stages=3),
    "imagenet64": _preset([1536] * 5, [96] * 5, bf16_stages=4),
    # for tests and CPU demos
    "tiny": Preset((16, 16, 16, 16), (4, 4, 4, 4), (1, 1, 1, 1), expansion=2, z_dim=16),
}


def resolve(r3gan_cfg: Any) -> Preset:
    """The preset with the section's overrides applied (ConfigError for an unknown preset)."""
    from gan_dist.config import ConfigError

    if r3gan_cfg.preset not in PRESETS:
        raise ConfigError(f"model.r3gan.preset={r3gan_cfg.preset!r} is not one of: {', '.join(PRESETS)}")
    p = PRESETS[r3gan_cfg.preset]
    pick = lambda key: getattr(p, key) if getattr(r3gan_cfg, key) is None else getattr(r3gan_cfg, key)
    return Preset(tuple(pick("widths")), tuple(pick("cardinalities")), tuple(pick("blocks")),
                  int(pick("expansion")), int(pick("z_dim")), p.bf16_stages)


def bf16_stages(r3gan_cfg: Any) -> int:
    """model.r3gan.bf16_stages as a count (`preset`: the preset's), checked against the stages."""
    from gan_dist.config import ConfigError

    value, p = r3gan_cfg.bf16_stages, resolve(r3gan_cfg)
    n = len(p.widths)
    if value == "preset":
        if p.bf16_stages > n:
            raise ConfigError(f"model.r3gan.bf16_stages=preset gives {r3gan_cfg.preset}'s {p.bf16_stages}, more "
                              f"than the {n} stages of model.r3gan.widths: give a number from 0 to {n}")
        return p.bf16_stages
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= n:
        raise ConfigError(f"model.r3gan.bf16_stages={value!r} must be an integer from 0 to {n} (the stages of "
                          f"G and D; 0: none) or preset ({r3gan_cfg.preset}'s reference value, {p.bf16_stages})")
    return value


def check_config(cfg: Any) -> None:
    """model.r3gan.bf16_stages against the precision settings: the stages are the reduced precision
    of an fp32 run, where nothing else lowers it (autocast or FSDP's param_dtype would already
    run every stage in bf16/fp16, and an fp16 autocast around bf16 stages mixes the two)."""
    from gan_dist.config import ConfigError

    n = bf16_stages(cfg.model.r3gan)
    if not n:
        return
    if cfg.train.precision != "fp32":
        raise ConfigError(f"model.r3gan.bf16_stages={cfg.model.r3gan.bf16_stages} ({n} stages in bf16) needs "
                          f"train.precision=fp32 (now {cfg.train.precision}, autocast for the whole model): set "
                          "train.precision=fp32 for the reference's mixed precision, or model.r3gan.bf16_stages=0")
    if cfg.parallel.fsdp.param_dtype not in (None, "fp32"):
        raise ConfigError(f"model.r3gan.bf16_stages={cfg.model.r3gan.bf16_stages} needs fp32 parameters in the "
                          f"other stages, but parallel.fsdp.param_dtype={cfg.parallel.fsdp.param_dtype} computes "
                          "them all in reduced precision: unset one of the two")


def check(model_cfg: Any) -> None:
    from gan_dist.config import ConfigError

    p = resolve(model_cfg.r3gan)
    n = len(p.widths)
    for key in ("cardinalities", "blocks"):
        if len(getattr(p, key)) != n:
            raise ConfigError(f"model.r3gan.{key} has {len(getattr(p, key))} entries, model.r3gan.widths {n}: "
                              "give one per stage")
    for key in ("widths", "cardinalities"):
        if any(v <= 0 for v in getattr(p, key)):
            raise ConfigError(f"model.r3gan.{key}={list(getattr(p, key))} must be positive")
    if any(b < 0 for b in p.blocks) or p.expansion <= 0 or p.z_dim <= 0 or model_cfg.r3gan.kernel_size % 2 == 0:
        raise ConfigError("model.r3gan: blocks must be >= 0, expansion and z_dim > 0, kernel_size odd")
    for w, c in zip(p.widths, p.cardinalities):
        if (w * p.expansion) % c:
            raise ConfigError(f"model.r3gan: width {w} x expansion {p.expansion} is not divisible by its "
                              f"cardinality {c} (model.r3gan.cardinalities)")
    bf16_stages(model_cfg.r3gan)
    if model_cfg.resolution != p.resolution:
        raise ConfigError(f"model.resolution={model_cfg.resolution}: model.r3gan.preset={model_cfg.r3gan.preset!r} "
                          f"with {n} stages makes {p.resolution}x{p.resolution} images (4 * 2^(stages - 1)); "
                          "set model.resolution to that, or give model.r3gan.widths/cardinalities/blocks "
                          "one entry per stage from 4x4 up")


def _stages(module: nn.Module) -> list[nn.Module]:
    return list(module.stages)


def spec(model_cfg: Any) -> ModelSpec:
    r = model_cfg.r3gan
    p = resolve(r)
    C, R, K = model_cfg.channels, model_cfg.resolution, model_cfg.num_classes
    n = bf16_stages(r)
    rev = lambda t: tuple(reversed(t))
    return ModelSpec(
        family="r3gan", z_dim=p.z_dim, num_classes=K, channels=C, resolution=R,
        make_generator=lambda: Generator(p.z_dim, p.widths, p.cardinalities, p.blocks, p.expansion, C, K,
                                         r.kernel_size, bf16_stages=n),
        make_discriminator=lambda: Discriminator(rev(p.widths), rev(p.cardinalities), rev(p.blocks), p.expansion,
                                                 C, K, r.kernel_size, bf16_stages=n),
        init=r3gan_init_, shard_units=_stages, check=check)


__all__ = ["Generator", "Discriminator", "PRESETS", "Preset", "bf16_stages", "check_config", "r3gan_init_",
           "resolve", "spec"]
