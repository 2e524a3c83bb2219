"""Data: the demo digits shards and the WebDataset reader."""
from __future__ import annotations

from typing import Any, Iterator

import torch

from gan_dist.data.demo import ensure_demo_shards
from gan_dist.data.reader import DataError, build_loader, expand_urls


def resolve_urls(data_cfg: Any) -> list[str]:
    """The shard list for `data.urls`; the demo digits (written on first use) when unset."""
    if data_cfg.urls in (None, "", []):
        return ensure_demo_shards()
    return expand_urls(data_cfg.urls, allow_pipe=data_cfg.allow_pipe)


def real_batches(cfg: Any, urls: list[str], rank: int, world_size: int,
                 device: torch.device) -> Iterator[torch.Tensor]:
    return build_loader(urls, cfg.data, cfg.model, cfg.train.batch_size, cfg.run.seed,
                        rank, world_size, device)


__all__ = ["DataError", "resolve_urls", "real_batches", "expand_urls", "ensure_demo_shards"]
