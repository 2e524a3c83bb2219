"""What the command-line tools that load a trained generator share (gan_dist.generate,
gan_dist.evaluate): the --ema/--no-ema choice and a runner that forms the process group,
turns bad input into a one-line error with exit code 2, and always tears the group down.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable

EXIT_USAGE = 2


class UsageError(ValueError):
    """Bad command-line input (a --ckpt that holds no generator, ...): reported by `run_cli`
    as one line and exit code 2, without a traceback."""


def add_weights_args(p: argparse.ArgumentParser) -> None:
    """--ckpt's weights: --ema / --no-ema (default: EMA when the run has it)."""
    ema = p.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="ema", action="store_true", default=None, help="require the EMA weights")
    ema.add_argument("--no-ema", dest="ema", action="store_false", help="use the training weights")


def run_cli(prog: str, body: Callable[[Any], None], usage_errors: tuple[type, ...] = ()) -> int:
    """Run `body(info)` in a process group formed from the launcher's environment (one process
    without one), each process with its share of the cores. A bad --ckpt, config or data
    (`UsageError`, `ConfigError` or one of `usage_errors`) is a one-line error and exit code 2;
    the group is torn down either way."""
    import torch

    from gan_dist import distributed as gdist
    from gan_dist.config import ConfigError
    from gan_dist.messages import error

    info = gdist.init_distributed()
    code = 1
    try:
        torch.set_num_threads(max(1, torch.get_num_threads() // max(1, info.local_world_size)))
        body(info)
        code = 0
    except (UsageError, ConfigError, *usage_errors) as exc:
        error(str(exc), prog)
        code = EXIT_USAGE
    finally:
        gdist.teardown(clean=code == 0)
    return code
