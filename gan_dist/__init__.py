"""gan_dist: distributed training of GANs (DDP, FSDP2, DeepSpeed ZeRO) with exact gradient syncing."""

__version__ = "0.1.0"

