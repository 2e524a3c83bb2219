"""What the benchmarks share: model presets, the timed runner, the meters, and the bench that
drives gan_dist's own training step.

Every number of a row comes from the device the run is on, measured in the same invocation:

* time: the host clock around whole repeats of a few iterations, after a device sync; the median
  repeat is reported. Its split into data wait, D phase, G phase and optimizer comes from marks
  on the device timeline (CUDA events on a GPU, the host clock on a CPU);
* FLOPs: `torch.utils.flop_counter` on one eager iteration of the same step; the peak: large
  matmuls of the row's dtype on the same device, on every rank at once (ranks sharing a CPU
  share its cores);
* memory: `torch.cuda.max_memory_allocated` on a GPU, the process's peak resident set on a CPU;
* communication: the payload of every collective during one iteration (a DDP comm hook for
  DDP's gradient buckets, wrapped `torch.distributed` functions for everything else).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import gc
import itertools
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as `python benchmarks/x.py` without an installed package
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from gan_dist.config import Config, load_config  # noqa: E402
from gan_dist.distributed import DistInfo  # noqa: E402

# Model presets: config overrides. dcgan-32 is the demo's model, dcgan-64 the DCGAN paper's and
# the PyTorch example's (64x64 RGB, ngf = ndf = 64), dcgan-64-xl a wide one for GPU memory and
# sharding (8x the width: ~64x the parameters and FLOPs).
MODELS: dict[str, dict[str, Any]] = {
    "dcgan-32": {"model.resolution": 32, "model.channels": 1, "model.dcgan.ngf": 32, "model.dcgan.ndf": 32, "model.dcgan.nz": 100},
    "dcgan-64": {"model.resolution": 64, "model.channels": 3, "model.dcgan.ngf": 64, "model.dcgan.ndf": 64, "model.dcgan.nz": 100},
    "dcgan-64-xl": {"model.resolution": 64, "model.channels": 3, "model.dcgan.ngf": 512, "model.dcgan.ndf": 512, "model.dcgan.nz": 100},
    # StyleGAN2 (docs/models.md): 64x64 with stylegan2-ada-pytorch's --cfg=auto sizes at that resolution
    # (channel_base 16384, 2 mapping layers), 256x256 with its --cfg=paper256 preset
    "stylegan2-64": {"model.arch": "stylegan2", "model.resolution": 64, "model.channels": 3,
                     "model.stylegan2.preset": "stylegan2", "model.stylegan2.channel_base": 16384,
                     "model.stylegan2.mapping_layers": 2},
    "stylegan2-256": {"model.arch": "stylegan2", "model.resolution": 256, "model.channels": 3,
                      "model.stylegan2.preset": "paper256"},
    # R3GAN (docs/models.md) at the reference's presets, with its recipe at the schedules' start values
    # (configs/r3gan_*.yaml): rpgan, R1 + R2 in every D step, Adam (0, 0.9)
    "r3gan-cifar10": {"model.arch": "r3gan", "model.resolution": 32, "model.channels": 3,
                      "model.r3gan.preset": "cifar10", "train.loss": "rpgan", "reg.r1_gamma": 0.05,
                      "reg.r2_gamma": 0.05, "reg.d_every": 1, "train.beta1": 0.0, "train.beta2": 0.9},
    "r3gan-ffhq64": {"model.arch": "r3gan", "model.resolution": 64, "model.channels": 3,
                     "model.r3gan.preset": "ffhq64", "train.loss": "rpgan", "reg.r1_gamma": 2.0,
                     "reg.r2_gamma": 2.0, "reg.d_every": 1, "train.beta1": 0.0, "train.beta2": 0.9},
}

PARTS = ("data", "D", "G", "opt")  # the split of an iteration; the rest is "other"

# Every row of every benchmark JSON has these keys (None where a value does not apply).
ROW_FIELDS = (
    "label", "impl", "strategy", "world_size", "model", "resolution", "channels", "ngf", "ndf", "nz",
    "params_G", "params_D", "batch_size", "global_batch_size", "precision", "channels_last", "compile",
    "matmul_conv",
    "data", "is_default", "warmup", "repeats", "iters_per_repeat",
    "ms_per_iter", "ms_per_iter_repeats", "ms_data", "ms_D", "ms_G", "ms_opt", "ms_other",
    "img_per_sec", "img_per_sec_per_gpu",
    "peak_mem_bytes", "mem_baseline_bytes", "mem_kind",
    "flops_per_iter", "achieved_flops_per_sec", "peak_flops_per_sec", "peak_dtype", "mfu",
    "comm_bytes_per_iter", "comm_min_bytes_per_iter", "comm_ratio", "comm_calls_per_iter",
    "comm_bytes_by_kind", "comm_scalar_bytes_per_iter", "comm_scalar_calls_per_iter",
    "speedup_vs_seed", "scaling_efficiency",
)


def model_overrides(model: str) -> list[str]:
    if model not in MODELS:
        raise SystemExit(f"--model {model!r} is not one of: {', '.join(MODELS)}")
    return [f"{k}={v}" for k, v in MODELS[model].items()]


def build_config(model: str, batch_size: int, precision: str, strategy: str, channels_last: bool,
                 compile: bool, overrides: Sequence[str] = (), matmul_conv: str = "auto") -> Config:
    """The run config of one row; `overrides` (`--set key=value`) come last and win."""
    return load_config(None, [*model_overrides(model), f"train.batch_size={batch_size}",
                              f"train.precision={precision}", f"parallel.strategy={strategy}",
                              f"train.channels_last={str(channels_last).lower()}",
                              f"train.compile={str(compile).lower()}", f"train.matmul_conv={matmul_conv}",
                              *overrides])


# ---- clocks ---------------------------------------------------------------------------------
class Clock:
    """Marks on the device timeline: CUDA events on a GPU, the host clock on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


class Timeline:
    """Labelled marks; the span from one mark to the next is charged to the first one's label."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.enabled = False
        self.points: list[tuple[str, Any]] = []

    def mark(self, label: str) -> None:
        if self.enabled:
            self.points.append((label, self.clock.now()))

    def take(self) -> dict[str, float]:
        """Milliseconds per label since the last call (after a device sync)."""
        self.clock.sync()
        out: dict[str, float] = {}
        for (label, a), (_, b) in zip(self.points, self.points[1:]):
            if label != "end":  # between iterations: the runner's own bookkeeping
                out[label] = out.get(label, 0.0) + self.clock.ms(a, b)
        self.points = []
        return out


def instrument_strategy(strategy: Any, timeline: Timeline) -> None:
    """Mark the strategy's D/G phases and optimizer steps; the loop itself is untouched."""
    phase, step = strategy.phase, strategy.step

    @contextlib.contextmanager
    def timed_phase(trained: str, sync: bool = True, double_backward: bool = False) -> Iterator[None]:
        timeline.mark(trained)
        try:
            with phase(trained, sync, double_backward):
                yield
        finally:
            timeline.mark("other")

    def timed_step(trained: str) -> None:
        timeline.mark("opt")
        try:
            step(trained)
        finally:
            timeline.mark("other")

    strategy.phase, strategy.step = timed_phase, timed_step


# ---- communication ----------------------------------------------------------------------------
COLLECTIVE_KINDS = {
    "all_reduce": "all_reduce", "all_reduce_coalesced": "all_reduce", "reduce": "reduce",
    "reduce_scatter": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_single": "reduce_scatter", "_reduce_scatter_base": "reduce_scatter",
    "reduce_scatter_tensor_coalesced": "reduce_scatter",
    "all_gather": "all_gather", "all_gather_into_tensor": "all_gather", "all_gather_single": "all_gather",
    "_all_gather_base": "all_gather", "all_gather_coalesced": "all_gather",
    "all_gather_into_tensor_coalesced": "all_gather",
    "broadcast": "broadcast", "scatter": "other", "gather": "other", "all_to_all": "other",
    "all_to_all_single": "other",
}


def _size(obj: Any) -> tuple[int, int]:
    """(bytes, elements) of a tensor or a list of tensors."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size(), obj.numel()
    if isinstance(obj, (list, tuple)):
        sizes = [_size(o) for o in obj]
        return sum(s[0] for s in sizes), sum(s[1] for s in sizes)
    return 0, 0


def payload(args: tuple, kwargs: dict) -> tuple[int, int]:
    """The full (unsharded) size a collective moves: its largest tensor argument.

    An all-reduce counts its buffer, a reduce-scatter its input, an all-gather its output: the
    convention of nccl-tests' "size", in which one all-reduce of every fp32 gradient of G and D,
    4 x (|G| + |D|) bytes, is the minimum a data-parallel iteration needs.
    """
    return max((_size(a) for a in (*args, *kwargs.values())), default=(0, 0))


class CommCounter:
    """Bytes and calls of collectives while `counting()`; scalars (flags) are kept apart."""

    def __init__(self) -> None:
        self.active = False
        self.originals: dict[str, Callable] = {}
        self._local = threading.local()
        self.reset()

    def reset(self) -> None:
        self.bytes: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.scalar_bytes = 0
        self.scalar_calls = 0

    def record(self, kind: str, nbytes: int, numel: int) -> None:
        if not self.active:
            return
        if numel <= 1:  # a flag or a scalar agreed between ranks, not model data
            self.scalar_bytes += nbytes
            self.scalar_calls += 1
            return
        self.bytes[kind] = self.bytes.get(kind, 0) + nbytes
        self.calls[kind] = self.calls.get(kind, 0) + 1

    def install(self) -> None:
        """Wrap the torch.distributed collectives (once per process, before any strategy exists:
        DeepSpeed looks its functions up when it initialises)."""
        if self.originals:
            return
        for name, kind in COLLECTIVE_KINDS.items():
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            self.originals[name] = fn
            setattr(dist, name, self._wrap(fn, kind))

    def _wrap(self, fn: Callable, kind: str) -> Callable:
        @functools.wraps(fn)
        def counted(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(self._local, "depth", 0)
            if depth == 0:  # only the outermost call: some collectives call others
                self.record(kind, *payload(args, kwargs))
            self._local.depth = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._local.depth = depth
        return counted

    def attach(self, strategy: Any) -> None:
        """DDP reduces gradient buckets in C++, past torch.distributed: count them in a comm hook
        that does what DDP's default does (average by all-reduce)."""
        from torch.nn.parallel import DistributedDataParallel

        for module in strategy.wrapped.values():
            if isinstance(module, DistributedDataParallel):
                module.register_comm_hook(None, self._ddp_hook())

    def _ddp_hook(self) -> Callable:
        all_reduce = self.originals.get("all_reduce", dist.all_reduce)

        def hook(state, bucket):  # noqa: ANN001, ANN202 (DDP rejects other annotations)
            buf = bucket.buffer()
            self.record("all_reduce", buf.numel() * buf.element_size(), buf.numel())
            buf.div_(dist.get_world_size())
            return all_reduce(buf, async_op=True).get_future().then(lambda fut: fut.value()[0])
        return hook

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        self.reset()
        self.active = True
        try:
            yield
        finally:
            self.active = False

    def summary(self) -> dict[str, Any]:
        return {"bytes": sum(self.bytes.values()), "calls": sum(self.calls.values()),
                "by_kind": dict(sorted(self.bytes.items())), "scalar_bytes": self.scalar_bytes,
                "scalar_calls": self.scalar_calls}


COMM = CommCounter()


def min_comm_bytes(params_G: int, params_D: int, world_size: int, updates: Optional[Sequence[str]] = None) -> int:
    """One fp32 reduction of each model's gradients per update; nothing with one process.

    `updates`: the models the counted iteration updated, one entry per update (a recipe's lazy
    phases add updates: StyleGAN2's Dreg and Greg); default one update of G and one of D."""
    if world_size <= 1:
        return 0
    sizes = {"G": params_G, "D": params_D}
    return 4 * sum(sizes[m] for m in (updates if updates is not None else ("D", "G")))


# ---- FLOPs, peak, memory ------------------------------------------------------------------------
class _NoModuleTracking:
    """Stands in for FlopCounterMode's per-module tracker, whose backward hooks torch refuses
    inside autograd.grad (a penalty's input gradient); only the total is needed here."""
    parents = {"Global"}

    def __enter__(self) -> "_NoModuleTracking":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def count_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _NoModuleTracking()
    with counter:
        fn()
    return int(counter.get_total_flops())


PEAK_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def measure_peak_flops(device: torch.device, name: str, n: Optional[int] = None,
                       budget_s: float = 2.0) -> float:
    """FLOP/s of the best of several n x n matmuls in `name` on `device`.

    fp32 on a GPU follows cuDNN's TF32 setting (on by default in PyTorch), since the convolutions
    it bounds run under that setting.
    """
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 2048)
    dtype = PEAK_DTYPES[name]
    tf32 = torch.backends.cuda.matmul.allow_tf32
    if cuda and name == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
        b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
        clock = Clock(device)
        reps = 10 if cuda else 1
        best, deadline, trials = 0.0, time.perf_counter() + budget_s, 0
        torch.mm(a, b)
        while trials < 3 or (time.perf_counter() < deadline and trials < 50):
            clock.sync()
            t0 = clock.now()
            for _ in range(reps):
                torch.mm(a, b)
            t1 = clock.now()
            clock.sync()
            best = max(best, reps * 2 * n ** 3 / (clock.ms(t0, t1) / 1e3))
            trials += 1
        return best
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


class MemoryMeter:
    """Peak memory of this process's device since `reset()`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda_max_memory_allocated" if device.type == "cuda" else "cpu_peak_rss"

    @staticmethod
    def _status(key: str) -> Optional[int]:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def reset(self) -> int:
        """Start a new peak; returns what is in use now (the baseline)."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        try:  # Linux: "5" resets the peak resident set size (VmHWM) to the current one
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        return self._status("VmRSS") or 0

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        hwm = self._status("VmHWM")
        if hwm is None:
            import resource
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return hwm


# ---- the environment ----------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def loadavg() -> Optional[list[float]]:
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


class OtherLoad:
    """How many CPU cores other processes kept busy while this run ran (Linux).

    Busy time of the whole machine (/proc/stat) minus the CPU time of this job's own processes
    (every rank, and loader workers that have exited), over the wall time. On a shared machine
    this says whether a row was timed while something else competed for the cores.
    """

    def __init__(self) -> None:
        self.start = (self._busy_s(), self._own_s(), time.perf_counter())

    @staticmethod
    def _busy_s() -> Optional[float]:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_s() -> float:
        import resource

        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    def cores(self) -> Optional[float]:
        """Collective with several ranks: the average number of cores busy with other work."""
        busy0, own0, t0 = self.start
        busy1, wall = self._busy_s(), time.perf_counter() - t0
        own = sum(gather(self._own_s() - own0))
        if busy0 is None or busy1 is None or wall <= 0:
            return None
        return round(max(0.0, (busy1 - busy0) - own) / wall, 3)


def environment(info: DistInfo) -> dict[str, Any]:
    from gan_dist.trainer import package_versions

    commit = None
    with contextlib.suppress(Exception):
        import subprocess
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    return {
        "device": info.device.type,
        "device_name": device_name(info.device),
        "device_count": torch.cuda.device_count() if info.device.type == "cuda" else None,
        "cpu_count": os.cpu_count(),
        "threads_per_process": torch.get_num_threads(),
        "world_size": info.world_size,
        "backend": info.backend,
        "launcher": info.launcher,
        "cuda": torch.version.cuda if info.device.type == "cuda" else None,
        "cudnn_benchmark": torch.backends.cudnn.benchmark if info.device.type == "cuda" else None,
        "versions": package_versions(),
        "git_commit": commit,
        "loadavg_start": loadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "argv": sys.argv,
    }


# ---- benches and the runner ---------------------------------------------------------------------
@dataclasses.dataclass
class TimingSpec:
    warmup: int = 3  # untimed iterations first (compiled rows: at least 3)
    repeats: int = 5  # timed repeats; the median is reported
    iters: int = 3  # iterations per repeat


class Bench:
    """One row: a training step to time. `row` holds what the row is (model, settings)."""

    impl = "?"

    def __init__(self, cfg: Config, info: DistInfo, data_kind: str, timeline: Timeline) -> None:
        self.cfg, self.info, self.data_kind, self.timeline = cfg, info, data_kind, timeline
        self.device = info.device
        self.row: dict[str, Any] = {}
        self.result: dict[str, Any] = {}
        self.failed: Optional[str] = None  # why setup refused these settings

    def setup(self) -> None:
        raise NotImplementedError

    def next_batches(self) -> Any:
        raise NotImplementedError

    def step(self, batches: Any) -> None:
        raise NotImplementedError

    def count_flops(self) -> int:
        """FLOPs of one iteration, counted on an eager copy (compiled code hides its ops)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def warmup_iters(self, spec: TimingSpec) -> int:
        return max(spec.warmup, 3) if self.cfg.train.compile else spec.warmup


def run_iteration(bench: Bench) -> None:
    tl = bench.timeline
    tl.mark("data")
    batches = bench.next_batches()
    tl.mark("other")
    bench.step(batches)
    tl.mark("end")


def run_benches(benches: Sequence[Bench], spec: TimingSpec, interleave: bool = False) -> None:
    """Warm up, count communication and FLOPs, then time; results land in `bench.result`.

    Interleaved, every bench is prepared first and the timed repeats go round-robin, so that a
    change of load on a shared machine hits all rows alike (for ratios measured side by side).
    """
    if not benches:
        return
    meter = MemoryMeter(benches[0].device)

    def prepare(b: Bench) -> None:
        b.result["flops_per_iter"] = b.count_flops()
        b.result["mem_baseline_bytes"] = meter.reset()
        try:
            b.setup()
        except (NotImplementedError, ValueError, RuntimeError) as exc:  # settings the strategy refuses
            b.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            with contextlib.suppress(Exception):
                b.close()
            return
        for _ in range(b.warmup_iters(spec)):
            run_iteration(b)
        with COMM.counting():
            run_iteration(b)
        b.result["comm"] = COMM.summary()
        b.result["comm_updates"] = getattr(b, "updates", None)  # the models that iteration updated
        b.result["repeats"] = []

    def repeat(b: Bench) -> None:
        b.timeline.enabled = True
        b.timeline.clock.sync()
        t0 = time.perf_counter()
        for _ in range(spec.iters):
            run_iteration(b)
        b.timeline.clock.sync()
        t1 = time.perf_counter()
        b.timeline.enabled = False
        parts = b.timeline.take()
        b.result["repeats"].append({"ms": (t1 - t0) * 1e3 / spec.iters,
                                    **{k: v / spec.iters for k, v in parts.items()}})

    def finish(b: Bench) -> None:
        b.result.setdefault("peak_mem_bytes", meter.peak())
        b.close()
        gc.collect()
        if b.device.type == "cuda":
            torch.cuda.empty_cache()

    if interleave:
        for b in benches:
            prepare(b)
            b.result["peak_mem_bytes"] = meter.peak()  # before the next bench allocates
        ok = [b for b in benches if b.failed is None]
        for _ in range(spec.repeats):
            for b in ok:
                repeat(b)
        for b in ok:
            finish(b)
    else:
        for b in benches:
            prepare(b)
            if b.failed is None:
                for _ in range(spec.repeats):
                    repeat(b)
                finish(b)


def rank_summary(bench: Bench, spec: TimingSpec) -> dict[str, Any]:
    """This rank's numbers of a finished bench (the median repeat and its split)."""
    reps = bench.result["repeats"]
    med = sorted(reps, key=lambda r: r["ms"])[len(reps) // 2]
    parts = {f"ms_{p}": med.get(p, 0.0) for p in PARTS}
    return {"ms_per_iter": med["ms"], "ms_per_iter_repeats": [round(r["ms"], 3) for r in reps], **parts,
            "ms_other": med["ms"] - sum(parts.values()),
            "peak_mem_bytes": bench.result["peak_mem_bytes"],
            "mem_baseline_bytes": bench.result["mem_baseline_bytes"],
            "flops_per_iter": bench.result["flops_per_iter"], "comm": bench.result["comm"]}


def make_row(bench: Bench, per_rank: Sequence[dict[str, Any]], peaks: dict[str, float],
             spec: TimingSpec) -> dict[str, Any]:
    """One JSON row from every rank's summary: the slowest rank sets the pace (ranks wait for
    each other in every reduction), memory is the largest rank's, communication rank 0's."""
    r0 = per_rank[0]
    slowest = max(per_rank, key=lambda r: r["ms_per_iter"])
    W = bench.info.world_size
    row = dict(bench.row)
    ms = slowest["ms_per_iter"]
    images = row["global_batch_size"]
    flops = r0["flops_per_iter"]
    dtype = row["precision"]
    peak = peaks.get(dtype)
    comm = r0["comm"]
    minimum = min_comm_bytes(row["params_G"], row["params_D"], W, bench.result.get("comm_updates"))
    row.update({
        "warmup": bench.warmup_iters(spec), "repeats": spec.repeats, "iters_per_repeat": spec.iters,
        "ms_per_iter": round(ms, 3), "ms_per_iter_repeats": slowest["ms_per_iter_repeats"],
        **{f"ms_{p}": round(slowest[f"ms_{p}"], 3) for p in (*PARTS, "other")},
        "img_per_sec": round(images / (ms / 1e3), 2),
        "img_per_sec_per_gpu": round(images / (ms / 1e3) / W, 2),
        "peak_mem_bytes": max(r["peak_mem_bytes"] for r in per_rank),
        "mem_baseline_bytes": max(r["mem_baseline_bytes"] for r in per_rank),
        "mem_kind": MemoryMeter(bench.device).kind,
        "flops_per_iter": flops,
        "achieved_flops_per_sec": round(flops / (ms / 1e3)),
        "peak_flops_per_sec": round(peak) if peak else None,
        "peak_dtype": dtype,
        "mfu": round(flops / (ms / 1e3) / peak, 4) if peak else None,
        "comm_bytes_per_iter": comm["bytes"],
        "comm_min_bytes_per_iter": minimum,
        "comm_updates": bench.result.get("comm_updates"),
        "comm_ratio": round(comm["bytes"] / minimum, 4) if minimum else None,
        "comm_calls_per_iter": comm["calls"],
        "comm_bytes_by_kind": comm["by_kind"],
        "comm_scalar_bytes_per_iter": comm["scalar_bytes"],
        "comm_scalar_calls_per_iter": comm["scalar_calls"],
        "speedup_vs_seed": None,
        "scaling_efficiency": None,
    })
    return row


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, on every rank (a list of one without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def measure_peaks(device: torch.device, dtypes: Sequence[str], n: Optional[int] = None,
                  before: Optional[dict[str, float]] = None) -> dict[str, float]:
    """Peak matmul FLOP/s per dtype, measured on every rank at the same time.

    Called before and after the rows (`before`: the first result), keeping the higher: a
    virtual machine's cores can run at a fraction of their speed for seconds at a time (seen
    here for bf16 matmuls on AMX: 360 vs 960 GFLOP/s on one core), and the peak is what the
    device does when nothing holds it back.
    """
    out = {}
    for name in dtypes:
        barrier()
        out[name] = max(measure_peak_flops(device, name, n), (before or {}).get(name, 0.0))
    return out


# ---- data ----------------------------------------------------------------------------------------
def real_source(cfg: Config, info: DistInfo, kind: str) -> Iterator[torch.Tensor]:
    """Real batches: `synthetic` cycles a few random batches already on the device (no data
    cost); `shards` is the trainer's own WebDataset loader on `data.urls` (default: the demo)."""
    B, C, R = cfg.train.batch_size, cfg.model.channels, cfg.model.resolution
    if kind == "synthetic":
        gen = torch.Generator(device=info.device).manual_seed(1000 + info.rank)
        pool = [torch.rand(B, C, R, R, device=info.device, generator=gen) * 2 - 1 for _ in range(4)]
        return itertools.cycle(pool)
    if kind == "shards":
        from gan_dist import distributed as gdist
        from gan_dist.data import make_loader, shared_shards

        shards = shared_shards(cfg, info.is_main, gdist.broadcast_object)
        return make_loader(cfg, shards, info.rank, info.world_size, info.device)
    raise SystemExit(f"--data {kind!r} is not one of: synthetic, shards")


def close_source(source: Any) -> None:
    close = getattr(source, "close", None)
    if callable(close):
        close()


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe(cfg: Config, info: DistInfo, model: str, data_kind: str) -> dict[str, Any]:
    """The fixed part of a row: what was run."""
    from gan_dist.models import build_models
    from gan_dist.parallel.base import matmul_convs_wanted

    G, D = build_models(cfg.model, cfg.run.seed)
    t = cfg.train
    per_iter = t.batch_size * t.grad_accum * t.d_steps
    return {"model": model, "resolution": cfg.model.resolution, "channels": cfg.model.channels,
            "ngf": cfg.model.dcgan.ngf, "ndf": cfg.model.dcgan.ndf, "nz": cfg.model.dcgan.nz,
            "loss": t.loss, "r1_gamma": cfg.reg.r1_gamma, "r2_gamma": cfg.reg.r2_gamma, "d_every": cfg.reg.d_every,
            "params_G": num_params(G), "params_D": num_params(D),
            "batch_size": t.batch_size, "global_batch_size": per_iter * info.world_size,
            "precision": t.precision, "channels_last": t.channels_last, "compile": t.compile,
            "matmul_conv": matmul_convs_wanted(t, info.device),
            "data": data_kind, "world_size": info.world_size}


# ---- gan_dist's step -----------------------------------------------------------------------------
_FLOPS_CACHE: dict[Any, int] = {}


class GanDistBench(Bench):
    """build_strategy + build_models + strategy.setup + train_step: the trainer's code path.

    The strategy is built at construction, so that one that cannot run here (not installed, not
    supported with these settings) is reported before anything is timed.
    """

    impl = "gan_dist"

    def __init__(self, cfg: Config, info: DistInfo, data_kind: str, timeline: Timeline, model: str) -> None:
        super().__init__(cfg, info, data_kind, timeline)
        from gan_dist.config import TrainConfig
        from gan_dist.parallel import build_strategy, resolve_strategy_name

        self.strategy = build_strategy(info, cfg)
        self.row = describe(cfg, info, model, data_kind)
        defaults = TrainConfig()
        t = cfg.train
        self.row.update(
            impl=self.impl, strategy=self.strategy.name,
            is_default=(t.precision, t.channels_last, t.compile, t.matmul_conv)
            == (defaults.precision, defaults.channels_last, defaults.compile, defaults.matmul_conv)
            and self.strategy.name == resolve_strategy_name("auto", info.world_size),
        )
        self.row["label"] = row_label(self.row)
        self.data: Any = None

    def setup(self) -> None:
        from gan_dist.build import setup_models

        self.recipe, self.spec, _ = setup_models(self.strategy, self.cfg)
        instrument_strategy(self.strategy, self.timeline)
        COMM.attach(self.strategy)
        self.data = real_source(self.cfg, self.info, self.data_kind)
        self.iteration = 0

    def next_batches(self) -> list:
        from gan_dist.build import step_batches

        return step_batches(self.cfg, self.spec, self.iteration, self.info.rank, self.info.world_size,
                            lambda: next(self.data), self.device)  # as Trainer.next_batches

    def step(self, batches: Any) -> None:
        from gan_dist.loop import train_step

        # the updates of this iteration (Dmain once per D step, every other due phase once), for
        # the communication minimum
        self.updates = [p.trains for p in self.recipe.due(self.iteration)
                        for _ in range(len(batches) if p.name == "Dmain" else 1)]
        train_step(self.strategy, self.recipe, batches, self.iteration)
        self.iteration += 1  # lazy phases come every reg.d_every iterations, as in training

    def count_flops(self) -> int:
        from gan_dist.build import setup_models, step_batches
        from gan_dist.loop import train_step
        from gan_dist.parallel.base import Strategy

        t, m = self.cfg.train, self.cfg.model
        key = (dataclasses.astuple(m), dataclasses.astuple(self.cfg.reg), t.batch_size, t.grad_accum, t.d_steps,
               t.loss, str(self.device))
        if key not in _FLOPS_CACHE:
            cfg = copy.deepcopy(self.cfg)
            # the convolutions' own FLOPs (the matmul formulation does the same multiply-adds)
            cfg.train.precision, cfg.train.compile, cfg.train.channels_last = "fp32", False, False
            cfg.train.matmul_conv = "never"
            eager = Strategy(self.info, cfg.train, cfg.parallel)
            recipe, spec, _ = setup_models(eager, cfg)
            gen = torch.Generator(device=self.device).manual_seed(0)

            def real() -> torch.Tensor:
                return torch.rand(t.batch_size, m.channels, m.resolution, m.resolution, device=self.device,
                                  generator=gen) * 2 - 1

            def flops_at(step: int) -> int:
                batches = step_batches(cfg, spec, step, 0, 1, real, self.device)
                return count_flops(lambda: train_step(eager, recipe, batches, step))

            # the average iteration: a lazy phase (due at step 0) counts 1/d_every of the time
            every, plain = cfg.reg.d_every, flops_at(1)
            _FLOPS_CACHE[key] = plain + (flops_at(0) - plain) // every if every > 1 else flops_at(0)
            eager.close()
        return _FLOPS_CACHE[key]

    def close(self) -> None:
        close_source(self.data)
        self.data = None
        self.strategy.close()


def row_label(row: dict[str, Any]) -> str:
    if row["impl"] != "gan_dist":
        return f"{row['impl']} {row['precision']}"
    bits = [row["strategy"], row["precision"]]
    if row["channels_last"]:
        bits.append("channels_last")
    if row["compile"]:
        bits.append("compile")
    if row["matmul_conv"]:
        bits.append("matmul_conv")
    return "gan_dist " + " ".join(bits) + (" (defaults)" if row.get("is_default") else "")


def add_seed_ratios(rows: list[dict[str, Any]]) -> None:
    seed = next((r for r in rows if r["impl"] == "seed_loop"), None)
    if seed is None:
        return
    for r in rows:
        if r["world_size"] == seed["world_size"] and r["batch_size"] == seed["batch_size"]:
            r["speedup_vs_seed"] = round(r["img_per_sec"] / seed["img_per_sec"], 3)


# ---- reports ------------------------------------------------------------------------------------
def _mib(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


def _flops(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x / 1e12:.2f} T" if x >= 1e12 else f"{x / 1e9:.1f} G"


def comm_cell(r: dict[str, Any]) -> str:
    """MB per iteration and, with several processes, the multiple of the minimum."""
    if not r["comm_bytes_per_iter"]:
        return "-"
    cell = f"{r['comm_bytes_per_iter'] / 1e6:.2f}"
    return cell + (f" ({r['comm_ratio']:.2f}x)" if r["comm_ratio"] is not None else "")


def markdown(result: dict[str, Any]) -> str:
    """The rows as a Markdown table, with the device and the peaks it was measured against."""
    env = result["env"]
    unit = "GPU" if env["device"] == "cuda" else "process"
    lines = [
        f"Device: {env['device_name']} ({env['device']}, {env['world_size']} process(es), "
        f"{env['threads_per_process']} thread(s) each); torch {env['versions'].get('torch')}; "
        f"load average {env.get('loadavg_start')} -> {env.get('loadavg_end')}; other processes kept "
        f"{env.get('other_processes_cpu_cores')} core(s) busy on average during the run.",
        "Peak matmul FLOP/s measured in this run: "
        + ", ".join(f"{k} {_flops(v)}FLOP/s" for k, v in result["peak_flops_per_sec"].items()) + ".",
        "",
        f"| row | img/s | img/s per {unit} | ms/iter | data | D | G | opt | other | mem MiB | FLOP/s | MFU "
        "| comm MB/iter (x min) | vs seed |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        comm = comm_cell(r)
        mem = r["peak_mem_bytes"] - (r["mem_baseline_bytes"] if r["mem_kind"] == "cpu_peak_rss" else 0)
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        vs_seed = "-" if r["speedup_vs_seed"] is None else f"{r['speedup_vs_seed']:.2f}x"
        lines.append(
            f"| {r['label']} (W={r['world_size']}, B={r['batch_size']}) | {r['img_per_sec']:.1f} "
            f"| {r['img_per_sec_per_gpu']:.1f} | {r['ms_per_iter']:.1f} | {r['ms_data']:.1f} | {r['ms_D']:.1f} "
            f"| {r['ms_G']:.1f} | {r['ms_opt']:.1f} | {r['ms_other']:.1f} | {_mib(mem)} "
            f"| {_flops(r['achieved_flops_per_sec'])} | {mfu} | {comm} | {vs_seed} |")
    for s in result.get("skipped", []):
        lines.append(f"\nSkipped: {s['label']}: {s['reason']}")
    lines.append("")
    if env["device"] != "cuda":
        lines.append("mem: peak resident set of the process above its size before the row's setup.")
    else:
        lines.append("mem: torch.cuda.max_memory_allocated during the row.")
    if result.get("summary"):
        lines += ["", result["summary"]]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: str | Path) -> None:
    """Images/s per GPU (per process on a CPU) and MFU of every row, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [f"{r['label']} W={r['world_size']}" for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 0.45 * len(rows) + 1.8), sharey=True)
    colors = ["tab:gray" if r["impl"] == "seed_loop" else ("tab:green" if r.get("is_default") else "tab:blue")
              for r in rows]
    y = range(len(rows))
    ax1.barh(y, [r["img_per_sec_per_gpu"] for r in rows], color=colors)
    ax1.set_yticks(list(y), labels, fontsize=8)
    ax1.invert_yaxis()
    env = result["env"]
    ax1.set_xlabel("images/s per " + ("GPU" if env["device"] == "cuda" else "process"))
    for i, r in enumerate(rows):
        ax1.annotate(f"{r['img_per_sec_per_gpu']:.0f}", (r["img_per_sec_per_gpu"], i), fontsize=7,
                     xytext=(2, -3), textcoords="offset points")
    ax2.barh(y, [100 * (r["mfu"] or 0) for r in rows], color=colors)
    ax2.set_xlabel("MFU (% of the measured matmul peak of the row's dtype)")
    model = rows[0]["model"] if rows else ""
    fig.suptitle(f"{model}, {env['device_name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: dict[str, Any], json_path: Optional[str], md_path: Optional[str],
                  plot_path: Optional[str]) -> str:
    text = markdown(result)
    for path, write in ((json_path, lambda p: p.write_text(json.dumps(result, indent=1) + "\n")),
                        (md_path, lambda p: p.write_text(text)),
                        (plot_path, lambda p: plot(result, p))):
        if path:
            p = Path(path)
            p.parent.mkdir(parents=True, exist_ok=True)
            write(p)
    return text
