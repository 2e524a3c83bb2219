"""What the side-by-side benchmarks against a reference implementation share
(benchmarks/stylegan2_reference.py, benchmarks/r3gan_reference.py): blocks of iterations that
alternate between the sides in one process, so that their ratio survives a machine shared with
other jobs."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def timed(step: Callable[[int], None], first: int, n: int) -> float:
    """Seconds for iterations first .. first + n - 1 of `step`."""
    t = time.perf_counter()
    for i in range(first, first + n):
        step(i)
    return time.perf_counter() - t


def alternate(sides: dict[str, Callable[[int], None]], batch: int, iters: int, repeats: int,
              digits: int = 3) -> dict[str, dict[str, Any]]:
    """One warm-up block per side (allocations, first-iteration paths), then `repeats` rounds of
    one `iters`-iteration block per side; per side: the blocks' seconds, and the median block as
    ms per iteration and images per second."""
    seconds: dict[str, list[float]] = {k: [] for k in sides}
    for step in sides.values():
        timed(step, 0, iters)
    it = iters
    for _ in range(repeats):
        for name, step in sides.items():
            seconds[name].append(timed(step, it, iters))
        it += iters
    rows = {}
    for name, secs in seconds.items():
        med = statistics.median(secs)
        rows[name] = {"s_per_block": [round(s, digits) for s in secs], "ms_per_iter": round(1000 * med / iters, 1),
                      "img_per_sec": round(batch * iters / med, 3)}
    return rows


def gan_dist_step(cfg: Any, batch: int) -> tuple[Callable[[int], None], dict[str, Any]]:
    """gan_dist's training iteration under `cfg` in this process, on uniform random real images:
    step(i) runs iteration i (its due phases), as the trainer does."""
    import torch

    from gan_dist import distributed as gdist
    from gan_dist.build import setup_models, step_batches
    from gan_dist.loop import train_step
    from gan_dist.parallel import build_strategy

    strategy = build_strategy(gdist.init_distributed(), cfg)
    recipe, spec, counts = setup_models(strategy, cfg)
    gen = torch.Generator().manual_seed(0)
    R, C = cfg.model.resolution, cfg.model.channels

    def real() -> torch.Tensor:
        return torch.rand(batch, C, R, R, generator=gen) * 2 - 1

    def step(i: int) -> None:
        train_step(strategy, recipe, step_batches(cfg, spec, i, 0, 1, real, torch.device("cpu")), i)

    return step, {"params": counts, "cfg": cfg}
