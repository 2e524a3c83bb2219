"""Memory and communication per GPU at 8 to 4096 GPUs, before booking the cluster.

    python -m gan_dist.plan --config configs/stylegan2_1b.yaml --gpus 8,64,512,4096 \\
        --strategy ddp,fsdp,deepspeed --batch-size 512 --link nvlink:450GB/s,ib:50GB/s \\
        --gpus-per-node 8 --json plan.json --md plan.md --plot plan.png

Each (world size, strategy) runs in a process of its own on torch's fake process group
(`init_process_group("fake")`: every collective returns at once, rank 0 of N): the real G and D
are wrapped by the real strategy code (`gan_dist.parallel`) and the recipe's phases run once
(`gan_dist.loop.train_step`, after a warm-up iteration), so sharding, bucketing and the phase
schedule are the ones training uses. Every torch.distributed collective of the counted iteration
is logged with its phase and bytes, and the bytes rank 0 holds are counted just before each
optimizer step (parameters, gradients, optimizer state; each storage once).

How a row is obtained (its "method"):

* simulated (fake tensors): FSDP2. G and D are built on the meta device, sharded there, then
  given fake CPU storage (FakeTensorMode): sizes, dtypes and collectives are real, no memory
  or arithmetic is spent. Works at any size.
* simulated (real tensors): DDP and DeepSpeed, whose C++ reducer and flat buffers need real
  storage. Used while G+D have at most --real-max-params parameters (this CPU computes one
  iteration at the per-rank batch).
* formula: DDP and ZeRO above that size: bytes per rank from the parameter counts (DDP: whole
  state; ZeRO-1/2/3 partitions of 1/N as DeepSpeed documents them) and the collectives each
  update needs (DDP: one all-reduce of the gradients; ZeRO: reduce-scatter of the gradients,
  all-gather of the parameters, ZeRO-3 per forward and backward).

Activations and FLOPs come from one iteration of the plain (undistributed) model on fake
tensors at the per-rank batch: the bytes autograd keeps for backward (parameters excluded),
their peak over the iteration, and torch.utils.flop_counter's count. The time model: compute
(--compute-ms, else FLOPs / --tflops, else FLOPs at the matmul rate measured on this machine)
plus each collective over a ring: all-reduce 2(N-1)/N of its bytes, reduce-scatter and
all-gather (N-1)/N of the full tensor, broadcast its bytes, at the intra-node bandwidth while
N <= --gpus-per-node and the inter-node one beyond (the ring then crosses the network), plus
the link latency per ring step. docs/scale.md explains the method and its limits.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

PROG = "gan_dist.plan"
STRATEGIES = ("ddp", "fsdp", "zero1", "zero2", "zero3")
REDUCING = ("all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single",
            "_reduce_scatter_base", "all_reduce_coalesced", "reduce_scatter_tensor_coalesced")
GATHERING = ("all_gather", "all_gather_into_tensor", "all_gather_single", "_all_gather_base",
             "all_gather_coalesced", "all_gather_into_tensor_coalesced", "broadcast", "scatter", "gather",
             "all_to_all", "all_to_all_single", "all_gather_object", "broadcast_object_list", "barrier")
UNITS = {"tb/s": 1e12, "gb/s": 1e9, "mb/s": 1e6, "tbit/s": 1e12 / 8, "gbit/s": 1e9 / 8, "gb/sec": 1e9}
LATENCY_UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3}
DDP_BUCKET_BYTES = 25 * 2 ** 20  # torch DDP's bucket_cap_mb default
GIB = 2 ** 30


# ---- command line ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Link:
    name: str
    bytes_per_s: float
    latency_s: float = 0.0


def parse_link(text: str) -> tuple[Link, Link]:
    """`intra[,inter]`, each `name:BANDWIDTH[:LATENCY]` (450GB/s, 400Gbit/s; 2us): the first is
    the link inside a node, the second between nodes (default: the first)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not 1 <= len(parts) <= 2:
        raise ValueError("give one or two links, intra-node first: e.g. nvlink:450GB/s,ib:50GB/s")
    links = []
    for part in parts:
        fields = part.split(":")
        if len(fields) not in (2, 3) or not fields[0]:
            raise ValueError(f"{part!r} is not name:BANDWIDTH[:LATENCY] (e.g. ib:50GB/s:5us)")
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z/]+)", fields[1].strip())
        if not m or m.group(2).lower() not in UNITS:
            raise ValueError(f"{fields[1]!r} in {part!r} is not a bandwidth: use a number with one of "
                             + ", ".join(("TB/s", "GB/s", "MB/s", "Gbit/s")))
        bw = float(m.group(1)) * UNITS[m.group(2).lower()]
        lat = 0.0
        if len(fields) == 3:
            m2 = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(ns|us|ms)", fields[2].strip())
            if not m2:
                raise ValueError(f"{fields[2]!r} in {part!r} is not a latency: use e.g. 5us, 800ns, 0.01ms")
            lat = float(m2.group(1)) * LATENCY_UNITS[m2.group(2)]
        if bw <= 0:
            raise ValueError(f"{part!r}: the bandwidth must be positive")
        links.append(Link(fields[0], bw, lat))
    return links[0], links[-1]


def parse_strategies(text: str) -> list[str]:
    """ddp, fsdp, deepspeed (ZeRO-1, 2 and 3), deepspeed:zero2 (one stage), or zero1/zero2/zero3."""
    out: list[str] = []
    for item in [s.strip() for s in text.split(",") if s.strip()]:
        if item == "deepspeed":
            names = ["zero1", "zero2", "zero3"]
        elif item.startswith("deepspeed:"):
            names = [item.split(":", 1)[1]]
            if names[0] not in ("zero1", "zero2", "zero3"):
                raise ValueError(f"{item!r}: the ZeRO stage must be zero1, zero2 or zero3")
        elif item in STRATEGIES:
            names = [item]
        else:
            raise ValueError(f"{item!r} is not a strategy: use ddp, fsdp, deepspeed, deepspeed:zero1|zero2|zero3")
        out += [n for n in names if n not in out]
    if not out:
        raise ValueError("no strategy given")
    return out


def parse_gpus(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{text!r} is not a comma-separated list of GPU counts (e.g. 8,64,512)") from None
    if not sizes or any(n < 1 for n in sizes):
        raise ValueError(f"{text!r}: GPU counts must be positive integers")
    return sizes


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", help="a training config (YAML); key=value overrides follow")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. model.stylegan2.channel_max=1024")
    p.add_argument("--gpus", default="8,64,512,4096", help="comma-separated world sizes")
    p.add_argument("--strategy", default="ddp,fsdp,deepspeed", help="ddp, fsdp, deepspeed[:zero1|zero2|zero3]")
    p.add_argument("--batch-size", type=int, default=None,
                   help="global batch (images per iteration on all GPUs); default: train.batch_size per GPU")
    p.add_argument("--link", default="nvlink:450GB/s,ib:50GB/s",
                   help="intra-node[,inter-node] links, name:BANDWIDTH[:LATENCY] (e.g. nvlink:450GB/s:2us)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--compute-ms", type=float, default=None, help="compute time of one iteration per GPU")
    p.add_argument("--tflops", type=float, default=None,
                   help="achieved TFLOP/s of one GPU: compute = counted FLOPs / this (default: this machine's "
                        "measured matmul rate)")
    p.add_argument("--real-max-params", type=float, default=50e6,
                   help="DDP and DeepSpeed run with real tensors up to this many parameters (G+D), "
                        "above it they are a formula")
    p.add_argument("--gpu-memory", default="16,24,40,48,80,96,141,192",
                   help="GPU sizes in GiB for the 'fits in' column")
    p.add_argument("--json", help="write the plan here")
    p.add_argument("--md", help="write the Markdown tables here")
    p.add_argument("--plot", help="write a plot (PNG) here")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per simulated configuration")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_intermixed_args(argv)


# ---- the collective log -----------------------------------------------------------------------------
def _numel(obj: Any) -> tuple[int, int]:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel(), obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        pairs = [_numel(o) for o in obj]
        return sum(a for a, _ in pairs), sum(b for _, b in pairs)
    return 0, 0


def _payload(name: str, args: tuple, kwargs: dict) -> Any:
    """What a collective sends: a reduce-scatter's whole input, an all-gather's shard, an
    all-reduce's or broadcast's buffer (the convention of the tests' collective logs)."""
    for key in ("input", "input_tensor", "input_list", "tensor", "tensors"):
        if key in kwargs:
            return kwargs[key]
    if name.startswith(("reduce_scatter", "_reduce_scatter", "all_gather", "_all_gather")) and len(args) > 1:
        return args[1]
    return args[0] if args else None


class Collectives:
    """Every outermost torch.distributed collective while `active`, with the recipe phase it ran in."""

    def __init__(self) -> None:
        self.active = False
        self.label = "outside"  # the tests' label: "D-phase", "D-step", "G-phase", "G-step", "between"
        self.phase = "setup"  # the recipe phase: Dmain, Dreg, Gmain, Greg
        self.calls: list[dict] = []
        self._depth = 0

    def install(self) -> None:
        import torch.distributed as dist

        for name in REDUCING + GATHERING:
            fn = getattr(dist, name, None)
            if fn is not None:
                setattr(dist, name, self._wrap(name, fn))

    def _wrap(self, name: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            outer = self._depth == 0
            self._depth += 1
            try:
                if outer and self.active:
                    numel, nbytes = _numel(_payload(name, args, kwargs))
                    self.calls.append({"phase": self.phase, "label": self.label, "op": name,
                                       "numel": numel, "bytes": nbytes})
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
        return wrapper

    def attach(self, strategy: Any, recipe: Any, step: int, d_steps: int) -> None:
        """Label calls with the phase or optimizer step they belong to (the loop is untouched):
        the recipe's due phases are stepped in order, so the k-th optimizer step ends the k-th update."""
        orders = [p.name for p in recipe.due(step) for _ in range(d_steps if p.name == "Dmain" else 1)]
        orig_phase, orig_step = strategy.phase, strategy.step
        done = [0]

        def current() -> str:
            return orders[done[0]] if self.active and done[0] < len(orders) else "other"

        @contextlib.contextmanager
        def phase(trained: str, sync: bool = True, double_backward: bool = False) -> Any:
            with orig_phase(trained, sync, double_backward):
                self.label, self.phase = f"{trained}-phase", current()
                try:
                    yield
                finally:
                    self.label = "between"

        def step_(trained: str) -> None:
            self.label, self.phase = f"{trained}-step", current()
            try:
                orig_step(trained)
            finally:
                self.label = "between"
                if self.active:
                    done[0] += 1

        strategy.phase, strategy.step = phase, step_


# ---- counting bytes ---------------------------------------------------------------------------------
def _storage(t: Any) -> Optional[tuple[int, int]]:
    """(identity, bytes) of the storage `t` lives in, real or fake; None for meta or empty."""
    t = t.to_local() if hasattr(t, "to_local") else t
    try:
        s = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    if s.nbytes() == 0 or (s.device.type == "meta" and not _is_fake(t)):
        return None
    return s._cdata, s.nbytes()


def _is_fake(t: Any) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def _tensors_in(obj: Any, depth: int = 3, seen: Optional[set] = None) -> Iterable[Any]:
    """Tensors reachable from `obj` through attributes and containers: a ZeRO optimizer's gradient
    partitions and buckets."""
    import torch

    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
        if obj.grad is not None:
            yield obj.grad
        return
    if depth == 0 or isinstance(obj, (str, bytes, int, float, torch.nn.Module)):
        return
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        children = list(obj)
    elif hasattr(obj, "__dict__"):
        children = list(vars(obj).values())
    else:
        return
    for child in children:
        yield from _tensors_in(child, depth - 1, seen)


def state_bytes(strategy: Any, trained: str) -> dict[str, int]:
    """Bytes rank 0 holds just before `trained`'s optimizer step, each storage in the first category
    that claims it: parameters (shards, ZeRO-3 partitions), optimizer (Adam's moments and ZeRO's
    fp32 master partitions, "master" also alone), gradients of `trained` (its .grad and the ZeRO
    optimizer's partitions and buckets). The categories of benchmarks/memory.py."""
    claimed: dict[int, tuple[str, int]] = {}

    def claim(category: str, tensors: Iterable[Any]) -> None:
        for t in tensors:
            st = _storage(t)
            if st is not None and st[0] not in claimed:
                claimed[st[0]] = (category, st[1])

    params = {n: list(m.parameters()) for n, m in strategy.raw.items()}
    for ps in params.values():
        claim("params", ps)
        claim("params", [p.ds_tensor for p in ps if hasattr(p, "ds_tensor")])
    for opt in strategy.optimizers.values():
        inner = getattr(opt, "optimizer", opt)
        claim("optimizer", [v for st in inner.state.values() for v in st.values() if hasattr(v, "untyped_storage")])
        claim("master", [p for g in inner.param_groups for p in g["params"]])
        for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
            claim("master", [t for t in getattr(opt, name, []) if hasattr(t, "untyped_storage")])
    for name in sorted(params, key=lambda n: n != trained):
        category = "grads" if name == trained else "idle_grads"
        claim(category, [p.grad for p in params[name] if p.grad is not None])
        opt = strategy.optimizers[name]
        if opt is not getattr(opt, "optimizer", opt):
            claim(category, _tensors_in(opt))
    out = {c: 0 for c in ("params", "grads", "optimizer", "master", "idle_grads")}
    for category, nbytes in claimed.values():
        out[category] += nbytes
    out["optimizer"] += out["master"]
    return out


class SavedActivations:
    """Bytes autograd keeps for backward (parameters excluded: they are counted as parameters),
    live and at their peak: each saved storage counted once until its last holder is freed."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self._refs: dict[int, list] = {}

    def _pack(self, t: Any) -> Any:
        import torch

        if isinstance(t, torch.nn.Parameter):
            return t
        st = _storage(t)
        if st is None:
            return t
        key, nbytes = st
        entry = self._refs.get(key)
        if entry is None:
            entry = self._refs[key] = [0, nbytes]
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        weakref.finalize(t, self._release, key)
        return t

    def _release(self, key: int) -> None:
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._refs[key]

    def hooks(self) -> Any:
        import torch

        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)


# ---- one configuration (a child process) ----------------------------------------------------------
def _config(job: dict) -> Any:
    from gan_dist.config import load_config

    name = job["strategy"]
    strategy = "none" if name == "none" else ("deepspeed" if name.startswith("zero") else name)
    extra = [f"parallel.deepspeed.zero_stage={name[-1]}"] if name.startswith("zero") else []
    # the GPU's own convolution kernels (not the CPU's matmul form), eager: what a cluster runs
    return load_config(job["config"], [*job["overrides"], f"parallel.strategy={strategy}", *extra,
                                       f"train.batch_size={job['per_rank_batch']}", "train.grad_accum=1",
                                       "train.matmul_conv=never", "train.compile=false"])


def _batches(cfg: Any, spec: Any, b: int, seed: int) -> list:
    import torch

    from gan_dist.loop import Batch

    res, ch = cfg.model.resolution, cfg.model.channels
    out = []
    for j in range(cfg.train.d_steps):
        index = range(j * b, (j + 1) * b)
        c = torch.zeros(b, dtype=torch.long) if spec.num_classes else None
        out.append([Batch(real=torch.rand(b, ch, res, res) * 2 - 1, z=torch.randn(b, spec.z_dim), real_c=c,
                          fake_c=c, g_inputs=spec.draw_g_inputs(seed, index, torch.device("cpu")))])
    return out


def _every(recipe: Any) -> int:
    return math.lcm(*[p.every for p in recipe.phases])


def simulate(job: dict) -> dict:
    """Wrap G and D with the strategy on a fake group of job["world_size"] and run the recipe:
    per-rank state bytes and the collectives of one iteration in which every phase is due."""
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from gan_dist.build import setup_models
    from gan_dist.distributed import DistInfo
    from gan_dist.loop import train_step
    from gan_dist.models import model_spec
    from gan_dist.optim import optimizer_factory
    from gan_dist.parallel import build_strategy
    from gan_dist.recipe import build_recipe

    log = Collectives()
    log.install()
    N = job["world_size"]
    os.environ.setdefault("LOCAL_RANK", "0")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=N)
    cfg = _config(job)
    info = DistInfo(rank=0, world_size=N, local_rank=0, local_world_size=min(N, job["gpus_per_node"]),
                    node_rank=0, device=torch.device("cpu"), backend="fake", launcher="plan")
    strategy = build_strategy(info, cfg)
    fake = job["method"] == "simulated (fake tensors)"
    mode: Any = contextlib.nullcontext()
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        spec = model_spec(cfg.model)
        recipe = build_recipe(cfg, spec)
        with torch.device("meta"):
            G, D = spec.build(cfg.run.seed)
        numel = spec.param_counts(G, D)
        for m in (G, D):
            # Module.to would try to swap fake parameters (torch refuses); they are on the
            # planner's device already, so prepare_module's move is a no-op here
            m.to = functools.partial(lambda self, *a, **k: self, m)
        strategy.setup(G, D, optimizer_factory(cfg.train, recipe), spec.shard_units, spec.checkpoint_units)
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode:
            for m in (G, D):
                m.to_empty(device="cpu")  # sharded on meta, now fake CPU storage of the same sizes
            for opt in strategy.optimizers.values():
                # torch refuses fused Adam for meta parameters; the run on a GPU (and on this CPU)
                # uses it: the same state, stepped on the device without a host sync
                if isinstance(opt, torch.optim.Adam):
                    opt.defaults.update(fused=True, foreach=False)
                    opt._step_supports_amp_scaling = True
                    for g in opt.param_groups:
                        g.update(fused=True, foreach=False)
    else:
        recipe, spec, numel = setup_models(strategy, cfg)
    if strategy.name == "ddp":
        # DDP reduces in C++; a Python hook with the same payload (the bucket) makes each
        # all-reduce a torch.distributed call the log sees (the default hook needs the
        # result a fake group does not return)
        def allreduce(state, bucket):  # noqa: ANN001, ANN202  (DDP checks the annotations)
            buf = bucket.buffer()
            dist.all_reduce(buf.div_(N))
            fut = torch.futures.Future()
            fut.set_result(buf)
            return fut

        for n in ("G", "D"):
            strategy.wrapped[n].register_comm_hook(None, allreduce)

    counted = _every(recipe)
    counts: dict[str, dict[str, int]] = {}
    real_step = strategy.step

    def counting_step(trained: str) -> None:
        counts[trained] = state_bytes(strategy, trained)
        real_step(trained)

    with mode:
        torch.manual_seed(0)
        b = job["per_rank_batch"]
        train_step(strategy, recipe, _batches(cfg, spec, b, cfg.run.seed), 0)  # warm-up: Adam's state exists
        strategy.step = counting_step
        log.attach(strategy, recipe, counted, cfg.train.d_steps)
        log.active = True
        train_step(strategy, recipe, _batches(cfg, spec, b, cfg.run.seed), counted)
        log.active = False
    row = {"params_bytes": counts["G"]["params"], "grads_bytes": counts["D"]["grads"] + counts["G"]["grads"],
           "optimizer_bytes": counts["G"]["optimizer"], "master_bytes": counts["G"]["master"],
           "params_G": numel["G"], "params_D": numel["D"], "collectives": log.calls,
           "counted_step": counted, "phase_every": {p.name: p.every for p in recipe.phases},
           "zero_stage": getattr(strategy, "zero_stage", None), "ran": strategy.name,
           "compute_dtype": str(strategy.precision.dtype).replace("torch.", "")}
    strategy.close()
    dist.destroy_process_group()
    return row


def profile(job: dict) -> dict:
    """One iteration of the plain model on fake tensors at the per-rank batch: FLOPs, the peak of
    saved activations, parameter counts and sizes (for the formula rows)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from gan_dist.distributed import DistInfo
    from gan_dist.loop import train_step
    from gan_dist.models import model_spec
    from gan_dist.parallel.base import Strategy
    from gan_dist.recipe import build_recipe

    cfg = _config({**job, "strategy": "none"})
    info = DistInfo(0, 1, 0, 1, 0, torch.device("cpu"), None, "plan")
    strategy = Strategy(info, cfg.train, cfg.parallel)
    spec = model_spec(cfg.model)
    recipe = build_recipe(cfg, spec)
    with torch.device("meta"):
        G, D = spec.build(cfg.run.seed)
    numel = spec.param_counts(G, D)
    sizes = {n: [p.numel() for p in m.parameters()] for n, m in (("G", G), ("D", D))}
    for m in (G, D):
        m.to = functools.partial(lambda self, *a, **k: self, m)
    saved = SavedActivations()
    with FakeTensorMode(allow_non_fake_inputs=True):
        for m in (G, D):
            m.to_empty(device="cpu")
        strategy.setup(G, D, lambda name, params, **kw: torch.optim.SGD(params, lr=0.0), spec.shard_units,
                       spec.checkpoint_units)
        counted = _every(recipe)
        flops = FlopCounterMode(display=False)
        # its per-module tracker's backward hooks are refused inside autograd.grad (a penalty);
        # only the total is needed (as benchmarks/common.py's count_flops)
        flops.mod_tracker = contextlib.nullcontext()
        flops.mod_tracker.parents = {"Global"}
        # FLOPs per update, named by the recipe phase it ends (the phases are stepped in order);
        # forward and backward only: the optimizer's arithmetic is not the model's compute
        orders = [p.name for p in recipe.due(counted)
                  for _ in range(cfg.train.d_steps if p.name == "Dmain" else 1)]
        per_phase: dict[str, int] = {}
        seen = [0]

        def step(trained: str) -> None:
            total = flops.get_total_flops()
            name = orders[len(seen) - 1] if len(seen) <= len(orders) else "other"
            per_phase[name] = per_phase.get(name, 0) + total - seen[-1]
            seen.append(total)
            strategy.optimizers[trained].zero_grad(set_to_none=True)

        strategy.step = step
        with flops, saved.hooks():
            train_step(strategy, recipe, _batches(cfg, spec, job["per_rank_batch"], cfg.run.seed), counted)
    every = {p.name: p.every for p in recipe.phases}
    # a phase due every k steps costs 1/k of its FLOPs per iteration, as its collectives do
    amortised = sum(f / every.get(name, 1) for name, f in per_phase.items())
    return {"flops": amortised, "flops_per_phase": per_phase, "activation_peak_bytes": saved.peak, "params_G": numel["G"],
            "params_D": numel["D"], "param_sizes": sizes, "compute_dtype": str(strategy.precision.dtype).replace("torch.", ""),
            "phase_every": {p.name: p.every for p in recipe.phases},
            "phases": [[p.name, p.trains, p.every] for p in recipe.phases], "d_steps": cfg.train.d_steps}


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    from gan_dist.config import ConfigError

    job = json.loads(args.child)
    try:
        row = profile(job) if job["kind"] == "profile" else simulate(job)
    except ConfigError as exc:  # a setting this strategy or model refuses: the user's to change
        row = {"config_error": str(exc)}
    Path(args.out).write_text(json.dumps(row))


# ---- formulas ---------------------------------------------------------------------------------------
def formula(name: str, N: int, prof: dict) -> dict:
    """DDP and ZeRO by the book, for models too large to simulate with real tensors: bytes per rank
    from the parameter counts, and the collectives of one iteration (every phase due)."""
    e = 2 if prof["compute_dtype"] in ("bfloat16", "float16") else 4
    P = prof["params_G"] + prof["params_D"]
    part = lambda n: math.ceil(n / N)  # noqa: E731  (a partition, padded to equal parts)
    calls: list[dict] = []
    every = prof["phase_every"]
    updates = [(ph, trains) for ph, trains, _ in prof["phases"] for _ in range(prof["d_steps"] if ph == "Dmain" else 1)]

    def add(phase: str, label: str, op: str, numel: int, esize: int) -> None:
        calls.append({"phase": phase, "label": label, "op": op, "numel": numel, "bytes": numel * esize})

    for phase, trains in updates:
        n_tr = prof["params_" + trains]
        if name == "ddp":
            total = n_tr * 4  # DDP keeps fp32 parameters; autocast leaves the gradients fp32
            for k in range(math.ceil(total / DDP_BUCKET_BYTES)):
                add(phase, f"{trains}-phase", "all_reduce", min(DDP_BUCKET_BYTES, total - k * DDP_BUCKET_BYTES) // 4, 4)
        else:
            if name == "zero3":
                for _ in range(2):  # the trained model, gathered for its forward and its backward
                    add(phase, f"{trains}-phase", "all_gather_into_tensor", part(n_tr), e)
                if phase == "Dmain":  # G's forward for the fakes
                    add(phase, "D-phase", "all_gather_into_tensor", part(prof["params_G"]), e)
                if phase == "Gmain":  # D, frozen, gathered for the forward and the backward through it
                    for _ in range(2):
                        add(phase, "G-phase", "all_gather_into_tensor", part(prof["params_D"]), e)
            add(phase, f"{trains}-phase", "reduce_scatter_tensor", n_tr, e)
            if name in ("zero1", "zero2"):  # the updated partitions back to every rank
                add(phase, f"{trains}-step", "all_gather_into_tensor", part(n_tr), e)
        add(phase, f"{trains}-step", "all_reduce", 1, 4)  # the agreed non-finite flag
    if name == "ddp":
        params, grads, opt, master = 4 * P, 4 * P, 8 * P, 0
    else:
        master = 4 * sum(part(n) for n in (prof["params_G"], prof["params_D"]))
        opt = 3 * master  # Adam's two fp32 moments and the fp32 master partition
        params = e * P if name != "zero3" else e * sum(part(n) for n in (prof["params_G"], prof["params_D"]))
        grads = e * P if name == "zero1" else e * sum(part(n) for n in (prof["params_G"], prof["params_D"]))
    return {"params_bytes": params, "grads_bytes": grads, "optimizer_bytes": opt, "master_bytes": master,
            "params_G": prof["params_G"], "params_D": prof["params_D"], "collectives": calls,
            "zero_stage": None if name == "ddp" else int(name[-1]), "ran": "ddp" if name == "ddp" else "deepspeed",
            "compute_dtype": prof["compute_dtype"], "phase_every": every}


# ---- the time model ---------------------------------------------------------------------------------
def ring_cost(op: str, nbytes: int, N: int) -> tuple[float, int]:
    """(bytes each rank sends, ring steps) for one collective: the payload convention of the log
    (all-gather: this rank's shard; reduce-scatter: the whole input; all-reduce: the buffer)."""
    if N == 1:
        return 0.0, 0
    if "all_reduce" in op or op == "reduce":
        return 2 * (N - 1) / N * nbytes, 2 * (N - 1)
    if "reduce_scatter" in op:
        return (N - 1) / N * nbytes, N - 1
    if "all_gather" in op:
        return (N - 1) * nbytes, N - 1
    if op in ("broadcast", "scatter", "gather"):
        return float(nbytes), N - 1
    return float(nbytes), 1


def comm_seconds(calls: list[dict], N: int, intra: Link, inter: Link, per_node: int,
                 every: dict[str, int]) -> tuple[float, float, dict[str, dict]]:
    """Seconds and bytes sent per rank per iteration (a phase due every k steps counts 1/k), per phase."""
    link = intra if N <= per_node else Link(inter.name, min(intra.bytes_per_s, inter.bytes_per_s),
                                            max(intra.latency_s, inter.latency_s))
    total_s, total_b = 0.0, 0.0
    phases: dict[str, dict] = {}
    for c in calls:
        sent, steps = ring_cost(c["op"], c["bytes"], N)
        secs = sent / link.bytes_per_s + steps * link.latency_s
        w = 1.0 / every.get(c["phase"], 1)
        ph = phases.setdefault(c["phase"], {"every": every.get(c["phase"], 1), "calls": 0, "bytes": 0, "sent_bytes": 0.0,
                                            "seconds": 0.0, "ops": {}})
        ph["calls"] += 1
        ph["bytes"] += c["bytes"]
        ph["sent_bytes"] += sent
        ph["seconds"] += secs
        ph["ops"][c["op"]] = ph["ops"].get(c["op"], 0) + 1
        total_s += w * secs
        total_b += w * sent
    return total_s, total_b, phases


def measured_tflops() -> float:
    """This machine's matmul rate (TFLOP/s) in fp32: the compute model's default."""
    import torch

    a = torch.randn(1024, 1024)
    a @ a
    t0 = time.perf_counter()
    for _ in range(5):
        a @ a
    return 5 * 2 * 1024 ** 3 / (time.perf_counter() - t0) / 1e12


# ---- the sweep --------------------------------------------------------------------------------------
def run_child(job: dict, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="gan_dist-plan-") as tmp:
        out = Path(tmp) / "row.json"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
            env.pop(key, None)
        cmd = [sys.executable, "-m", PROG, "--child", json.dumps(job), "--out", str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{job['strategy']} at {job['world_size']} GPUs failed (exit {proc.returncode}):\n"
                               + proc.stderr[-4000:])
        row = json.loads(out.read_text())
    if "config_error" in row:
        raise ValueError(f"--strategy {job['strategy']} cannot run this config at {job['world_size']} GPUs: "
                         f"{row['config_error']}")
    return row


def plan(args: argparse.Namespace) -> dict:
    """Profile once per per-rank batch, simulate (or compute) each (world size, strategy), price it."""
    from gan_dist.config import load_config

    sizes = parse_gpus(args.gpus)
    names = parse_strategies(args.strategy)
    intra, inter = parse_link(args.link)
    cfg = load_config(args.config, args.overrides)
    base_batch = cfg.train.batch_size
    batches = {}
    for N in sizes:
        global_batch = args.batch_size if args.batch_size is not None else base_batch * N
        if global_batch < N:
            raise ValueError(f"--batch-size {global_batch} cannot feed --gpus {N}: {global_batch / N:g} images per GPU "
                             f"(below 1); use at most {global_batch} GPUs or --batch-size >= {N}")
        batches[N] = (global_batch, global_batch // N)
    job0 = {"config": args.config, "overrides": list(args.overrides), "gpus_per_node": args.gpus_per_node}
    profiles: dict[int, dict] = {}
    for b in sorted({b for _, b in batches.values()}):
        print(f"{PROG}: profiling one iteration at {b} images per GPU (fake tensors)", file=sys.stderr, flush=True)
        profiles[b] = run_child({**job0, "kind": "profile", "strategy": "none", "world_size": 1, "per_rank_batch": b},
                                args.timeout)
    tflops = args.tflops if args.tflops is not None else (None if args.compute_ms is not None else measured_tflops())
    memories = [float(x) for x in args.gpu_memory.split(",") if x]
    rows = []
    for N in sizes:
        global_batch, b = batches[N]
        prof = profiles[b]
        P = prof["params_G"] + prof["params_D"]
        for name in names:
            if name == "fsdp":
                method = "simulated (fake tensors)"
            elif P <= args.real_max_params:
                method = "simulated (real tensors)"
            else:
                method = "formula"
            t0 = time.perf_counter()
            print(f"{PROG}: {name} at {N} GPUs ({method})", file=sys.stderr, flush=True)
            if method == "formula":
                res = formula(name, N, prof)
            else:
                res = run_child({**job0, "kind": "simulate", "strategy": name, "world_size": N,
                                 "per_rank_batch": b, "method": method}, args.timeout)
            every = res["phase_every"]
            comm_s, sent, phases = comm_seconds(res["collectives"], N, intra, inter, args.gpus_per_node, every)
            compute_ms = args.compute_ms if args.compute_ms is not None else prof["flops"] / (tflops * 1e12) * 1e3
            # ZeRO-3 and FSDP hold a gathered block (and prefetch the next) beyond their shards
            gathers = [c["bytes"] * N for c in res["collectives"] if "all_gather" in c["op"]]
            transient = 2 * max(gathers) if gathers and (name in ("fsdp", "zero3")) else 0
            if method == "formula" and name == "zero3":
                # the formula gathers a model in one call; ZeRO-3 gathers a module (at least one
                # prefetch bucket) at a time
                from gan_dist.parallel.deepspeed import BUCKET

                largest = max(max(v) for v in prof["param_sizes"].values())
                transient = 2 * max(largest, BUCKET) * (2 if res["compute_dtype"] in ("bfloat16", "float16") else 4)
            state = res["params_bytes"] + res["grads_bytes"] + res["optimizer_bytes"]
            total = state + prof["activation_peak_bytes"] + transient
            fits = next((m for m in sorted(memories) if total <= m * GIB), None)
            comm_ms = comm_s * 1e3
            rows.append({
                "world_size": N, "strategy": name, "method": method, "ran": res["ran"], "zero_stage": res["zero_stage"],
                "global_batch": global_batch, "per_rank_batch": b, "params_G": res["params_G"], "params_D": res["params_D"],
                "compute_dtype": res["compute_dtype"],
                "params_bytes": res["params_bytes"], "grads_bytes": res["grads_bytes"],
                "optimizer_bytes": res["optimizer_bytes"], "master_bytes": res["master_bytes"],
                "state_bytes": state, "activation_bytes": prof["activation_peak_bytes"], "gathered_bytes": transient,
                "total_bytes": total, "fits_gib": fits,
                "collectives_per_iteration": sum(1 / every.get(c["phase"], 1) for c in res["collectives"]),
                "sent_bytes_per_iteration": sent, "phases": phases,
                "flops_per_rank": prof["flops"], "flops_per_phase": prof["flops_per_phase"], "compute_ms": compute_ms, "comm_ms": comm_ms,
                "iteration_ms": compute_ms + comm_ms, "iteration_ms_overlapped": max(compute_ms, comm_ms),
                "comm_share": comm_ms / (compute_ms + comm_ms) if compute_ms + comm_ms > 0 else 0.0,
                "comm_dominates": comm_ms > compute_ms, "collectives": res["collectives"],
                "counted_step": res.get("counted_step"), "seconds": round(time.perf_counter() - t0, 2)})
    return {"command": "python -m " + PROG + " " + " ".join(sys.argv[1:]), "config": args.config,
            "overrides": list(args.overrides), "links": {"intra": vars(intra), "inter": vars(inter)},
            "gpus_per_node": args.gpus_per_node, "tflops": tflops, "compute_ms_given": args.compute_ms,
            "rows": rows}


def markdown(result: dict) -> str:
    gib = lambda n: f"{n / GIB:,.2f}"  # noqa: E731
    r0 = result["rows"][0]
    intra, inter = result["links"]["intra"], result["links"]["inter"]
    compute = (f"--compute-ms {result['compute_ms_given']}" if result["compute_ms_given"] is not None
               else f"counted FLOPs at {result['tflops']:.3g} TFLOP/s")
    lines = [f"# Plan: {result['config'] or 'default config'} {' '.join(result['overrides'])}".rstrip(), "",
             f"`{result['command']}`", "",
             f"G {r0['params_G'] / 1e6:,.1f} M + D {r0['params_D'] / 1e6:,.1f} M parameters, compute in "
             f"{r0['compute_dtype']}. Links: {intra['name']} {intra['bytes_per_s'] / 1e9:g} GB/s inside a node of "
             f"{result['gpus_per_node']} GPUs, {inter['name']} {inter['bytes_per_s'] / 1e9:g} GB/s between nodes. "
             f"Compute: {compute}.", "",
             "GiB per GPU (rank 0). state = params + grads + optimizer (Adam moments and ZeRO's fp32 master); "
             "activations: peak of what autograd keeps, at the per-GPU batch; gathered: FSDP/ZeRO-3 full "
             "parameters of the largest unit, twice (current and prefetched). Sent: bytes each GPU sends per "
             "iteration (lazy phases amortised). Time: compute + communication, not overlapped.", "",
             "| GPUs | strategy | method | batch/GPU | params | grads | optimizer | state | activations | gathered | "
             "total | fits in | collectives/it | sent/it | compute ms | comm ms | iteration ms | comm share |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        fits = f"{r['fits_gib']:g} GiB" if r["fits_gib"] is not None else "none listed"
        lines.append(f"| {r['world_size']} | {r['strategy']} | {r['method']} | {r['per_rank_batch']} | "
                     f"{gib(r['params_bytes'])} | {gib(r['grads_bytes'])} | {gib(r['optimizer_bytes'])} | "
                     f"{gib(r['state_bytes'])} | {gib(r['activation_bytes'])} | {gib(r['gathered_bytes'])} | "
                     f"{gib(r['total_bytes'])} | {fits} | {r['collectives_per_iteration']:,.1f} | "
                     f"{gib(r['sent_bytes_per_iteration'])} GiB | {r['compute_ms']:,.1f} | {r['comm_ms']:,.1f} | "
                     f"{r['iteration_ms']:,.1f} | {100 * r['comm_share']:.0f}%{' (dominates)' if r['comm_dominates'] else ''} |")
    lines += ["", "Collectives per phase (calls, MiB of payload, ms) at each world size:", "",
              "| GPUs | strategy | phase (every) | calls | payload MiB | ops | ms |", "|---:|---|---|---:|---:|---|---:|"]
    for r in result["rows"]:
        for ph, v in r["phases"].items():
            ops = ", ".join(f"{k} x{n}" for k, n in sorted(v["ops"].items()))
            lines.append(f"| {r['world_size']} | {r['strategy']} | {ph} ({v['every']}) | {v['calls']} | "
                         f"{v['bytes'] / 2**20:,.1f} | {ops} | {v['seconds'] * 1e3:,.2f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(r["strategy"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["strategy"] == name]
        x = [r["world_size"] for r in rows]
        a.plot(x, [r["total_bytes"] / GIB for r in rows], marker="o", label=name)
        b.plot(x, [r["iteration_ms"] for r in rows], marker="o", label=name)
    for ax, title in ((a, "GiB per GPU"), (b, "estimated iteration (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("GPUs")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    from gan_dist.config import ConfigError
    from gan_dist.messages import error

    checks = (("--gpus", parse_gpus, args.gpus), ("--strategy", parse_strategies, args.strategy),
              ("--link", parse_link, args.link))
    for flag, fn, value in checks:
        try:
            fn(value)
        except ValueError as exc:
            error(f"{flag} {value!r}: {exc}", PROG)
            return 2
    if args.gpus_per_node < 1:
        error(f"--gpus-per-node {args.gpus_per_node}: must be at least 1", PROG)
        return 2
    if args.batch_size is not None and args.batch_size < 1:
        error(f"--batch-size {args.batch_size}: must be at least 1", PROG)
        return 2
    try:
        result = plan(args)
    except (ValueError, ConfigError) as exc:
        error(str(exc), PROG)
        return 2
    text = markdown(result)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.md:
        Path(args.md).write_text(text)
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
