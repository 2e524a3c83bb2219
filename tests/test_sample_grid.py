"""The trainer's sample grid runs G in chunks of the training batch: a 64-image grid in one call
would not fit at 1024 px where a training batch of 2 does."""
from __future__ import annotations

import torch

from gan_dist import distributed as gdist
from gan_dist.config import load_config
from gan_dist.trainer import NUM_SAMPLES, Trainer
from tests.conftest import TINY


def test_grid_is_drawn_in_chunks_of_the_batch_and_equals_one_call(tmp_path):
    cfg = load_config(None, [*TINY, "train.batch_size=6", "parallel.strategy=none", f"run.dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg, gdist.init_distributed())
    G = trainer.strategy.sample_module("G")
    sizes: list[int] = []
    hook = G.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))
    try:
        images = trainer.samples(trainer.fixed_noise)
    finally:
        hook.remove()
    assert images.shape[0] == NUM_SAMPLES
    assert sizes == [6] * (NUM_SAMPLES // 6) + [NUM_SAMPLES % 6]
    G.eval()
    with torch.no_grad():
        whole = G(trainer.fixed_noise, None).float()
    torch.testing.assert_close(images, whole, rtol=1e-5, atol=1e-6)
