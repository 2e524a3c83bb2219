"""Train a GAN: config -> process group -> build -> loop -> outputs -> clean exit.

    accelerate launch gan_dist/train.py                               # demo: DCGAN on digits
    accelerate launch --multi_gpu --num_processes 8 gan_dist/train.py --config configs/dcgan_64.yaml
    torchrun --nproc_per_node 2 gan_dist/train.py train.steps=30 run.dir=/tmp/r
    python -m gan_dist.train --print-config
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from gan_dist.config import ConfigError, load_config, to_yaml
from gan_dist.launcher import apply_launcher_requests, configure_threads
from gan_dist.messages import error

EXIT_CONFIG = 2


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gan_dist.train", description="Train a GAN with gan_dist.",
                                epilog="Overrides are dotted keys: train.steps=30 run.dir=/tmp/r")
    p.add_argument("--config", help="YAML config file (configs/*.yaml)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        apply_launcher_requests(cfg, args.config, args.overrides)
    except ConfigError as exc:
        error(str(exc), kind="config error")
        return EXIT_CONFIG
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0

    from gan_dist import distributed as gdist
    from gan_dist.checkpoint import CheckpointError
    from gan_dist.data import DataError
    from gan_dist.faults import EXIT_CHECKPOINT, EXIT_NONFINITE, EXIT_RETRY, NonFiniteError
    from gan_dist.trainer import Trainer

    info = gdist.init_distributed()
    configure_threads(cfg, info.local_world_size, info.launcher)
    trainer = None
    code = 1
    try:
        trainer = Trainer(cfg, info)
        code = trainer.fit()
    except (ConfigError, DataError, NotImplementedError) as exc:
        error(str(exc))
        code = EXIT_CONFIG
    except CheckpointError as exc:
        error(str(exc), kind="checkpoint error")
        code = EXIT_CHECKPOINT
    except NonFiniteError as exc:
        error(str(exc))
        code = EXIT_NONFINITE
    finally:
        if trainer is not None:
            trainer.close()
        del trainer
        gdist.teardown(clean=code in (0, EXIT_RETRY))
    return code


if __name__ == "__main__":
    sys.exit(main())
