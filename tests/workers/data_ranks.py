"""One rank of the distributed data tests: take batches, write their keys and the counts as JSON."""
from __future__ import annotations

import argparse
import json
import os
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from gan_dist import distributed as gdist  # noqa: E402
from gan_dist.data import build_loader, shared_shards  # noqa: E402
from tests.workers.data_shards import RES, data_cfg  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--urls", required=True)
p.add_argument("--out", required=True)
p.add_argument("--mode", default="epoch")
p.add_argument("--remainder", default="pad")
p.add_argument("--workers", type=int, default=2)
p.add_argument("--batch", type=int, default=8)
p.add_argument("--batches", type=int, required=True)
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()

info = gdist.init_distributed()
cfg = SimpleNamespace(data=data_cfg(args.urls, mode=args.mode, num_workers=args.workers,
                                    epoch_remainder=args.remainder, max_skip_fraction=1.0))
shards = shared_shards(cfg, info.is_main, gdist.broadcast_object)
loader = build_loader(shards, cfg.data, 1, RES, args.batch, args.seed, info.rank, info.world_size,
                      torch.device("cpu"))
batches = [loader.next_batch() for _ in range(args.batches)]
summary = loader.global_stats()  # a collective: every rank's counts added up
local = loader.stats()
local.pop("by_shard")
with open(args.out, "w") as f:
    json.dump({"rank": info.rank, "world_size": info.world_size, "keys": [b.keys for b in batches],
               "padded": [b.padded.tolist() for b in batches], "epoch": loader.epoch,
               "batches_per_epoch": loader.spec.workers * loader.spec.batches_per_epoch if args.mode == "epoch" else None,
               "summary": summary, "local": local}, f)
loader.close()
gdist.teardown()
