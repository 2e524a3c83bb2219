"""How G and D are wrapped and synced. `build_strategy` picks the implementation; the loop
only sees the `Strategy` interface."""
from __future__ import annotations

from typing import Any

from gan_dist.distributed import DistInfo
from gan_dist.parallel.base import Precision, Strategy, frozen


def resolve_strategy_name(requested: str, world_size: int) -> str:
    if requested == "auto":
        return "ddp" if world_size > 1 else "none"
    return requested


def build_strategy(info: DistInfo, cfg: Any) -> Strategy:
    """The strategy object for `parallel.strategy`; errors name the key and the fix."""
    name = resolve_strategy_name(cfg.parallel.strategy, info.world_size)
    if name == "none":
        if info.world_size > 1:
            raise ValueError(f"parallel.strategy=none cannot run {info.world_size} processes: "
                             "use ddp, fsdp or deepspeed (or auto)")
        return Strategy(info, cfg.train, cfg.parallel)
    if name == "ddp":
        if info.world_size == 1:
            return Strategy(info, cfg.train, cfg.parallel)
        from gan_dist.parallel.ddp import DDPStrategy
        return DDPStrategy(info, cfg.train, cfg.parallel)
    if name == "fsdp":
        from gan_dist.parallel.fsdp import FSDPStrategy
        return FSDPStrategy(info, cfg.train, cfg.parallel)
    if name == "deepspeed":
        from gan_dist.parallel.deepspeed import DeepSpeedStrategy
        return DeepSpeedStrategy(info, cfg.train, cfg.parallel)
    raise ValueError(f"parallel.strategy={name!r} is not one of: auto, none, ddp, fsdp, deepspeed")


__all__ = ["Strategy", "Precision", "frozen", "build_strategy", "resolve_strategy_name"]
