"""A worker under `torchrun --max-restarts`: rank 1 dies after the group works in the first
FAILS attempts; in every restart the rank named by SLOW starts late, so that the other rank
reaches torchrun's (reused) store first and would read the dead attempt's gloo addresses."""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from gan_dist import distributed as gdist  # noqa: E402

attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
rank = int(os.environ["RANK"])
fails = int(os.environ.get("FAILS", "1"))
if attempt > 0 and rank == int(os.environ.get("SLOW", "1")):
    time.sleep(3)
info = gdist.init_distributed(timeout_s=float(os.environ.get("PG_TIMEOUT", "30")))
t = torch.full((1,), float(rank + 1))
dist.all_reduce(t)
assert t.item() == 3.0, t
print(f"attempt {attempt} rank {rank}: group up", flush=True)
if attempt < fails:
    if rank == 1:
        os._exit(1)
    time.sleep(60)  # in a collective-free wait: torchrun stops this rank after rank 1 died
gdist.teardown()
