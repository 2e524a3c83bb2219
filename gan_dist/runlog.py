"""What a run shows and writes as it goes: TensorBoard scalars and images, a progress bar with
images/s, and sample grids. Only rank 0 writes; the other ranks get a logger that does nothing.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import torch


class Throughput:
    """Images per second between two calls of `tick`, measured on the host clock."""

    def __init__(self) -> None:
        self._t = time.perf_counter()
        self._images = 0

    def tick(self, images: int) -> float:
        now = time.perf_counter()
        rate = (images - self._images) / max(now - self._t, 1e-9)
        self._t, self._images = now, images
        return rate


class RunLogger:
    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int = 0) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.writer = None
        self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        self.writer = SummaryWriter(str(self.run_dir / "tb"))
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="it",
                        dynamic_ncols=True, file=sys.stderr, mininterval=1.0,
                        disable=None if sys.stderr.isatty() else False)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        short = {k.split("/")[-1]: v for k, v in values.items()
                 if k in ("loss/D", "loss/G", "perf/img_per_sec")}
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in short.items()}, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self.enabled:
            self.bar.update(n)

    def images(self, step: int, tag: str, images: torch.Tensor, path: Optional[Path] = None) -> None:
        """A grid of images in [-1, 1] to TensorBoard and, when `path` is given, to a PNG."""
        if not self.enabled:
            return
        grid = make_grid(images)
        self.writer.add_image(tag, grid, step)
        if path is not None:
            save_grid(images, path)

    def info(self, message: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(message, file=sys.stderr)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.close()


def make_grid(images: torch.Tensor) -> torch.Tensor:
    import torchvision.utils as vutils

    nrow = max(1, int(len(images) ** 0.5))
    return vutils.make_grid(images.float().cpu(), nrow=nrow, padding=2, normalize=True, value_range=(-1, 1))


def save_grid(images: torch.Tensor, path: Path) -> None:
    import torchvision.utils as vutils

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    vutils.save_image(make_grid(images), str(path))
