"""Data: WebDataset tar shards (writer, distributed resumable reader) and the demo digits."""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from gan_dist.data.demo import ensure_demo_shards
from gan_dist.data.index import DataError, ShardSet, expand_urls, resolve_shards
from gan_dist.data.reader import Batch, ShardLoader, build_loader
from gan_dist.data.shape import DataShape, data_shape


def resolve_urls(data_cfg: Any) -> list[str]:
    """The shard list for `data.urls`; the demo digits (written on first use) when unset."""
    return resolve_shards(data_cfg, need_counts=False).urls


def shared_shards(cfg: Any, is_main: bool, broadcast: Callable[[Any], Any]) -> ShardSet:
    """The run's shards, resolved on the main rank and sent to all; a DataError there is
    raised on every rank, so no rank waits for one that has given up."""
    result: Optional[object] = None
    if is_main:
        try:
            result = resolve_shards(cfg.data, need_counts=cfg.data.mode == "epoch")
        except DataError as exc:
            result = exc
    result = broadcast(result)
    if isinstance(result, DataError):
        raise DataError(str(result))
    assert isinstance(result, ShardSet)
    return result


def make_loader(cfg: Any, shards: ShardSet, rank: int, world_size: int, device: torch.device) -> ShardLoader:
    """This rank's loader of the run config's data section."""
    return build_loader(shards, cfg.data, cfg.model.channels, cfg.model.resolution, cfg.train.batch_size,
                        cfg.run.seed, rank, world_size, device, num_classes=cfg.model.num_classes)


__all__ = ["Batch", "DataError", "DataShape", "ShardLoader", "ShardSet", "build_loader", "data_shape",
           "ensure_demo_shards", "expand_urls", "make_loader", "resolve_shards", "resolve_urls", "shared_shards"]
