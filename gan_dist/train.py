"""Train a GAN: config -> process group -> build -> loop -> outputs -> clean exit.

    accelerate launch gan_dist/train.py                               # demo: DCGAN on digits
    accelerate launch --multi_gpu --num_processes 8 gan_dist/train.py --config configs/dcgan_64.yaml
    torchrun --nproc_per_node 2 gan_dist/train.py train.steps=30 run.dir=/tmp/r
    python -m gan_dist.train --print-config
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a file (accelerate launch gan_dist/train.py):
    # the package directory must not shadow the standard library (gan_dist/logging.py)
    _HERE = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
from typing import Any, Optional  # noqa: E402

from gan_dist.config import ConfigError, load_config, to_yaml, was_set  # noqa: E402

EXIT_CONFIG = 2


def launcher_requests(env: Optional[dict] = None) -> dict[str, Any]:
    """Settings that `accelerate launch` (flags or its config file) asks for, as config keys."""
    env = dict(os.environ) if env is None else env
    out: dict[str, Any] = {}
    mixed = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if mixed not in ("no", ""):
        out["train.precision"] = mixed  # "no" leaves train.precision as configured
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        out["parallel.strategy"] = "fsdp"
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        out["parallel.strategy"] = "deepspeed"
    dynamo = env.get("ACCELERATE_DYNAMO_BACKEND", "no").lower()
    if dynamo not in ("no", ""):
        out["train.compile"] = dynamo
    return out


def apply_launcher_requests(cfg: Any, config_path: Optional[str], overrides: list[str],
                            env: Optional[dict] = None) -> None:
    """Honour what accelerate asked for, or refuse it; never ignore it."""
    for key, value in launcher_requests(env).items():
        section, name = key.split(".")
        current = getattr(getattr(cfg, section), name)
        if key == "train.precision" and value not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"accelerate launch asks for mixed precision {value!r}; gan_dist supports "
                              "bf16 and fp16 (set train.precision, or --mixed_precision no|bf16|fp16)")
        if key == "train.compile":
            if value != "inductor":
                raise ConfigError(f"accelerate launch asks for dynamo backend {value!r}; gan_dist compiles "
                                  "with inductor only (--dynamo_backend inductor, or train.compile=true)")
            value = True
        explicit = was_set(overrides, config_path, key)
        if key == "parallel.strategy" and current == "auto":
            explicit = False
        if explicit and current != value:
            raise ConfigError(f"accelerate launch asks for {key}={value} but the config sets {key}={current}: "
                              "change one of them")
        setattr(getattr(cfg, section), name, value)


def configure_threads(cfg: Any, local_world_size: int, launcher: str) -> None:
    """CPU threads per process: run.threads, else the cores shared among this node's processes.

    accelerate launch sets OMP_NUM_THREADS=1 by default, which would halve a 2-core CPU run;
    an OMP_NUM_THREADS set by the user (any other launcher) is respected.
    """
    import torch

    n = cfg.run.threads
    if n == 0:
        user_omp = os.environ.get("OMP_NUM_THREADS") if launcher != "accelerate" else None
        n = int(user_omp) if user_omp else max(1, (os.cpu_count() or 1) // max(1, local_world_size))
    torch.set_num_threads(n)


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
        print(f"gan_dist: config error: {exc}", file=sys.stderr)
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
        print(f"gan_dist: error: {exc}", file=sys.stderr)
        code = EXIT_CONFIG
    except CheckpointError as exc:
        print(f"gan_dist: checkpoint error: {exc}", file=sys.stderr)
        code = EXIT_CHECKPOINT
    except NonFiniteError as exc:
        print(f"gan_dist: error: {exc}", file=sys.stderr)
        code = EXIT_NONFINITE
    finally:
        if trainer is not None:
            trainer.close()
        del trainer
        gdist.teardown(clean=code in (0, EXIT_RETRY))
    return code


if __name__ == "__main__":
    sys.exit(main())
