"""What the training loop does when the world misbehaves: stop signals, non-finite updates, and
the fault-injection switch the tests use to provoke them.

Exit codes of `python -m gan_dist.train` (launch scripts act on them):

    0             finished
    2             configuration or data error (EXIT_CONFIG): fix the command
    3             stopped after `train.max_nonfinite` consecutive non-finite steps (EXIT_NONFINITE)
    4             a checkpoint cannot be written or used: unwritable directory, full disk, a
                  checkpoint that does not fit the model (EXIT_CHECKPOINT)
    75            stopped by SIGTERM/SIGUSR1/SIGINT after saving a checkpoint (EXIT_RETRY,
                  EX_TEMPFAIL of sysexits.h): run the same command again to continue
    anything else a crash: the newest checkpoint is still there

Under torchrun the launcher forwards SIGTERM and SIGINT to the workers by itself (add SIGUSR1 with
`--signals-to-handle SIGTERM,SIGINT,SIGUSR1`), gives them `--shutdown-timeout` seconds (default
30) to save, and then exits with its own code.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, Optional

import torch
import torch.distributed as dist

EXIT_NONFINITE = 3
EXIT_CHECKPOINT = 4
EXIT_RETRY = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
INJECT_NAN_ENV = "GAN_DIST_INJECT_NAN"


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with NaN/Inf losses or gradients."""


# ---- stop signals -----------------------------------------------------------------------------
class StopSignals:
    """Turns SIGTERM, SIGUSR1 and SIGINT into a request honoured at the next step boundary.

    The handler only records the signal: the current step finishes on every rank, the ranks
    agree (`StepAgreement`, an all-reduce) that one of them was asked to stop, and all of them
    save and exit together at the same step. A second SIGINT interrupts at once (Ctrl-C twice).
    """

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signum

    @property
    def code(self) -> int:
        """The signal received so far on this rank (0: none), for `StepAgreement`."""
        return self.received or 0


class StepAgreement:
    """Once per step the ranks agree on a few numbers (an all-reduce, MAX): the stop signal any
    of them received and the non-finite guard's counters. The host reads the agreed numbers one
    step later, so reading never waits for the step just queued on a GPU; on a CPU the
    all-reduce runs in the background while the next step computes.

    Every rank reads the record of step t after step t+1, so all of them act at the same step.
    """

    def __init__(self) -> None:
        self._pending: Optional[tuple[int, Any, torch.Tensor, Any]] = None

    def exchange(self, step: int, values: torch.Tensor) -> Optional[tuple[int, list[float]]]:
        """Start agreeing on `values` (a 1-D float tensor on the device) of `step`; returns the
        agreed record (step, values) of the previous exchange, or None on the first one."""
        previous = self.collect()
        values = values.detach().to(torch.float64)
        work = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            work = dist.all_reduce(values, op=dist.ReduceOp.MAX, async_op=True)
        event = None
        if values.device.type == "cuda":
            if work is not None:
                work.wait()  # NCCL: the current stream waits for the reduction; the host does not
                work = None
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            values = host
        self._pending = (step, work, values, event)
        return previous

    def collect(self) -> Optional[tuple[int, list[float]]]:
        """The agreed record of the last exchange (waits for it), or None if already read."""
        if self._pending is None:
            return None
        step, work, values, event = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        if work is not None:
            work.wait()
        return step, values.tolist()


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


# ---- non-finite guard -------------------------------------------------------------------------
class NonFiniteGuard:
    """Follows, on the device, the updates the strategy refused (NaN/Inf loss or gradient,
    agreed by all ranks): puts back the BatchNorm statistics that a refused update's forward
    passes polluted, and counts the steps in a row with a refused update. Nothing here syncs
    the host; `streak`, `scalars()` and `state_dict()` read the counters (logging, checkpoints),
    and `values()` hands them to the per-step `StepAgreement`.
    """

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy
        self.streak_t = torch.zeros((), device=strategy.device)  # steps in a row with a refused update
        self._before: dict[str, torch.Tensor] = {}
        self._buffers: dict[str, list[torch.Tensor]] = {}

    def before_step(self) -> None:
        self._before = {n: c.clone() for n, c in self.strategy.skipped.items()}
        self._buffers = {n: [b.detach().clone() for b in m.buffers()] for n, m in self.strategy.raw.items()}

    @torch.no_grad()
    def after_step(self) -> torch.Tensor:
        """1.0 (a 0-dim device tensor) if an update of this step was refused, else 0.0."""
        any_bad = torch.zeros((), dtype=torch.bool, device=self.streak_t.device)
        for name, module in self.strategy.raw.items():
            bad = self.strategy.skipped[name] > self._before[name]
            any_bad = any_bad | bad
            for buf, saved in zip(module.buffers(), self._buffers[name]):
                buf.copy_(torch.where(bad, saved, buf))
        self._buffers = {}
        self.streak_t = (self.streak_t + 1) * any_bad
        return any_bad.float()

    @property
    def streak(self) -> int:
        return int(self.streak_t.item())

    def values(self) -> list[torch.Tensor]:
        """[streak, skipped G updates, skipped D updates] as device tensors."""
        return [self.streak_t, self.strategy.skipped["G"], self.strategy.skipped["D"]]

    def scalars(self) -> dict[str, float]:
        out = {f"nonfinite/skipped_updates_{n}": float(c) for n, c in self.strategy.skipped_updates.items()}
        out["nonfinite/consecutive_steps"] = float(self.streak)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_updates": self.strategy.skipped_updates, "streak": self.streak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.strategy.set_skipped_updates(state["skipped_updates"])
        self.streak_t.fill_(int(state["streak"]))


# ---- fault injection (tests) ------------------------------------------------------------------
def parse_inject_nan(value: Optional[str]) -> Optional[tuple[int, int, int]]:
    """GAN_DIST_INJECT_NAN=RANK:STEP[:COUNT] -> (rank, first step, count; 0 = for ever).

    A fault-injection switch for tests and drills: rank RANK's real batch becomes NaN in steps
    STEP .. STEP+COUNT-1 (1-based step numbers). Unset in normal runs.
    """
    if not value:
        return None
    parts = value.split(":")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        nums = []
    if len(nums) not in (2, 3) or nums[0] < 0 or nums[1] < 1 or (len(nums) == 3 and nums[2] < 0):
        raise ValueError(f"{INJECT_NAN_ENV}={value!r} is not RANK:STEP[:COUNT] (e.g. 1:3 or 0:5:0 for ever)")
    return nums[0], nums[1], nums[2] if len(nums) == 3 else 1


class FaultInjector:
    """Applies GAN_DIST_INJECT_NAN to a trainer's batches.

    `install` wraps the trainer's `next_batches` only when the variable is set, so a normal run
    has no fault-injection code in its step at all."""

    def __init__(self, rank: int, spec: tuple[int, int, int]) -> None:
        self.rank = rank
        self.nan = spec

    @classmethod
    def install(cls, trainer: Any, env: Optional[dict] = None) -> Optional["FaultInjector"]:
        env = os.environ if env is None else env
        spec = parse_inject_nan(env.get(INJECT_NAN_ENV))
        if spec is None:
            return None
        injector = cls(trainer.info.rank, spec)
        if injector.rank == 0:
            print(f"gan_dist: fault injection active: {INJECT_NAN_ENV}={env.get(INJECT_NAN_ENV)}",
                  file=sys.stderr, flush=True)
        produce = trainer.next_batches
        trainer.next_batches = lambda: injector(trainer.step + 1, produce())
        return injector

    def __call__(self, step: int, batches: list) -> list:
        """Rank `rank`'s first real micro-batch of 1-based `step` becomes NaN, when due."""
        rank, first, count = self.nan
        if self.rank == rank and step >= first and (count == 0 or step < first + count):
            batches[0][0].real = torch.full_like(batches[0][0].real, float("nan"))
        return batches
