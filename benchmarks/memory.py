"""Per-rank bytes of parameters, gradients and optimizer state: DDP, FSDP and ZeRO-1/2/3.

    python benchmarks/memory.py                                   # world sizes 1 and 2, all strategies
    python benchmarks/memory.py --strategies ddp,fsdp,zero3 --world-sizes 2 --precision bf16
    python benchmarks/memory.py --precision fp32,bf16 --json benchmarks/results/memory.json --md benchmarks/results/memory.md
    python benchmarks/memory.py --render benchmarks/results/memory.json      # the table of earlier results
    python benchmarks/memory.py --config configs/stylegan2_256.yaml --strategies ddp,fsdp --world-sizes 2 \
        --batch-size 2 --json benchmarks/results/memory_stylegan2_256.json --md benchmarks/results/memory_stylegan2_256.md
    python benchmarks/memory.py --config configs/stylegan2_256.yaml --strategies ddp,fsdp --world-sizes 2 \
        --batch-size 2 --set train.activation_checkpointing=true     # blocks recompute their activations

Each (world size, strategy) runs as its own job (torchrun for several processes) on a wide
DCGAN (64x64 RGB, ngf = ndf = 256: ~91 M parameters, 365 MB in fp32), or on the model and
recipe of `--config FILE` (its batch size and precision replaced by the options), built by
`build_strategy` exactly as the trainer does, with the recipe's optimizers and the EMA of G
the config asks for. Both iterations are the first one (step 0), at which every lazy phase of
the recipe (R1, path length) is due. After the warm-up iteration (Adam's state exists), the
next one is followed until just before each optimizer step, when the model being updated has
its gradients; there every rank counts the bytes of the tensors it holds, each storage once:

* parameters: what the model's parameters store on this rank (an FSDP shard, a ZeRO-3
  partition, or the whole model), plus any flat buffer they are views of;
* gradients: the parameters' .grad (local shards) and the gradient partitions and reduce
  buckets the ZeRO optimizer keeps;
* optimizer: the optimizer's state (Adam's moments) and the fp32 master partitions ZeRO
  updates in place of the parameters (also shown alone, as "master");
* ema: the fp32 average of G's weights this rank keeps (its shard under FSDP and ZeRO-3),
  not part of params+grads+optimizer, shown on its own and in the "with EMA" ratio.

Each model's gradients are counted before its own step; buffers the other model keeps
allocated meanwhile are not counted twice.

Tensors found nowhere else are reported as "other" (data, BatchNorm buffers, activations),
and the peak memory of the process (resident set on a CPU, allocated memory on a GPU) is given
as a cross-check. "vs DDP" compares params+grads+optimizer with DDP's at the same world size.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import MemoryMeter, environment  # noqa: E402

WIDE = {"model.resolution": 64, "model.channels": 3, "model.dcgan.ngf": 256, "model.dcgan.ndf": 256, "model.dcgan.nz": 100}
STRATEGIES = {"ddp": [], "fsdp": [], "zero1": ["parallel.deepspeed.zero_stage=1"],
              "zero2": ["parallel.deepspeed.zero_stage=2"], "zero3": ["parallel.deepspeed.zero_stage=3"]}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated: " + ", ".join(STRATEGIES))
    p.add_argument("--world-sizes", default="1,2", help="comma-separated process counts on this node")
    p.add_argument("--precision", default="fp32", help="comma-separated: fp32, bf16, fp16")
    p.add_argument("--batch-size", type=int, default=2, help="images per process")
    p.add_argument("--config", help="a config file (model, recipe, EMA) instead of the wide DCGAN")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every job (e.g. model.dcgan.ngf=128)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--md", help="write a markdown table here")
    p.add_argument("--render", metavar="JSON", help="only print (and --md) the table of an earlier --json")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: strategy of this job, writes --out
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- counting -------------------------------------------------------------------------------------
def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _storage(t: torch.Tensor) -> Optional[tuple[int, int]]:
    """(address, bytes) of the memory `t` lives in; None for tensors without real storage."""
    try:
        s = _local(t).untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    if s.nbytes() == 0 or s.device.type == "meta":
        return None
    return s.data_ptr(), s.nbytes()


def tensors_in(obj: Any, depth: int = 3, seen: Optional[set] = None) -> Iterable[torch.Tensor]:
    """Tensors reachable from `obj` through attributes, dicts, lists and tuples (`depth` levels)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
        if hasattr(obj, "grad") and obj.grad is not None:
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
        yield from tensors_in(child, depth - 1, seen)


def census(strategy: Any, trained: str, ema: Any = None) -> dict[str, int]:
    """Bytes this rank holds, by category, just before `trained`'s optimizer step; every storage
    counted once, in the first category that claims it (parameters, optimizer, gradients).

    "grads" are `trained`'s: its parameters' .grad and, under ZeRO, the gradient partitions and
    buckets of its optimizer. Those the other model keeps allocated meanwhile (ZeRO's buffers
    persist between steps) are "idle_grads", so that adding the two models' counts does not
    count a buffer twice.
    """
    claimed: dict[int, tuple[str, int]] = {}

    def claim(category: str, tensors: Iterable[torch.Tensor]) -> None:
        for t in tensors:
            st = _storage(t)
            if st is not None and st[0] not in claimed:
                claimed[st[0]] = (category, st[1])

    params = {n: list(m.parameters()) for n, m in strategy.raw.items()}
    for ps in params.values():
        claim("params", ps)
        claim("params", [p.ds_tensor for p in ps if hasattr(p, "ds_tensor")])  # ZeRO-3 partitions
    for opt in strategy.optimizers.values():
        inner = getattr(opt, "optimizer", opt)  # DeepSpeed wraps the torch optimizer
        claim("optimizer", [v for st in inner.state.values() for v in st.values() if isinstance(v, torch.Tensor)])
        claim("master", [p for g in inner.param_groups for p in g["params"]])  # ZeRO: fp32 master partitions
        for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):  # between steps
            claim("master", [t for t in getattr(opt, name, []) if isinstance(t, torch.Tensor)])
    if ema is not None:
        claim("ema", ema.shadow)
    for name in sorted(params, key=lambda n: n != trained):  # the trained model first
        category = "grads" if name == trained else "idle_grads"
        claim(category, [p.grad for p in params[name] if p.grad is not None])
        opt = strategy.optimizers[name]
        if opt is not getattr(opt, "optimizer", opt):  # a ZeRO optimizer: its gradient partitions, buckets
            claim(category, tensors_in(opt))
    gc.collect()
    claim("other", (o for o in gc.get_objects() if isinstance(o, torch.Tensor)))
    out = {c: 0 for c in ("params", "grads", "optimizer", "master", "ema", "idle_grads", "other")}
    for category, nbytes in claimed.values():
        out[category] += nbytes
    out["optimizer"] += out["master"]  # the master copy is optimizer state, shown on its own too
    return out


# ---- one job --------------------------------------------------------------------------------------
def child(args: argparse.Namespace) -> None:
    from gan_dist import distributed as gdist
    from gan_dist.config import load_config
    from gan_dist.build import setup_models, step_batches
    from gan_dist.ema import build_ema
    from gan_dist.loop import train_step
    from gan_dist.parallel import build_strategy
    from gan_dist.schedules import initial

    info = gdist.init_distributed()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.world_size))
    name = args.child
    strategy_key = "deepspeed" if name.startswith("zero") else name
    model = [] if args.config else [f"{k}={v}" for k, v in WIDE.items()]
    cfg = load_config(args.config, [*model, f"train.batch_size={args.batch_size}", "train.grad_accum=1",
                                    "train.d_steps=1", f"train.precision={args.precision}",
                                    f"parallel.strategy={strategy_key}", *STRATEGIES[name], *args.overrides])
    meter = MemoryMeter(info.device)
    baseline = meter.reset()
    strategy = build_strategy(info, cfg)
    recipe, spec, numel = setup_models(strategy, cfg)
    ema = build_ema(strategy, initial(cfg).ema) if args.config else None  # the wide DCGAN's rows: without

    gen = torch.Generator().manual_seed(info.rank)
    res = cfg.model.resolution

    def real() -> torch.Tensor:
        return (torch.rand(args.batch_size, cfg.model.channels, res, res, generator=gen) * 2 - 1).to(info.device)

    def batches() -> list:
        return step_batches(cfg, spec, 0, info.rank, info.world_size, real, info.device)

    train_step(strategy, recipe, batches(), 0)  # warm-up: Adam's state now exists
    if ema is not None:
        ema.update(args.batch_size * info.world_size, args.batch_size * info.world_size)
    counts: dict[str, dict[str, int]] = {}
    real_step = strategy.step

    def counting_step(trained: str) -> None:
        # the last of a model's phases (Dreg after Dmain) overwrites: parameters, optimizer state
        # and gradient storage are the same in each
        counts[trained] = census(strategy, trained, ema)  # its gradients are here, reduced
        real_step(trained)

    # each phase's peak: the resident set's high-water mark (the allocator's on a GPU) from the
    # phase's start to its end, above what was in use at its start (activations, gathered
    # parameters, temporaries); restarting the peak per phase, so the whole job's is kept aside
    peak = meter.peak()
    phase_peaks: list[dict[str, Any]] = []
    real_phase = strategy.phase

    @contextlib.contextmanager
    def measured_phase(trained: str, sync: bool = True, double_backward: bool = False) -> Iterator[None]:
        # what autograd saves for the backward(s), each storage once, the rank's own parameter
        # storages excluded (counted above): activations, and under FSDP the gathered
        # parameters the graph holds. On a CPU the resident set keeps what earlier phases freed,
        # so this, not the resident set, says what each phase needs.
        own = {st[0] for m in strategy.raw.values() for p in m.parameters() if (st := _storage(p)) is not None}
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            st = _storage(t)
            if st is not None and st[0] not in own:
                saved[st[0]] = st[1]
            return t

        start = meter.reset()
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                    real_phase(trained, sync, double_backward):
                yield
        finally:
            top = meter.peak()
            phase_peaks.append({"model": trained, "second_order": double_backward, "saved_bytes": sum(saved.values()),
                                "start_bytes": start, "peak_bytes": top, "above_start_bytes": top - start})

    strategy.step, strategy.phase = counting_step, measured_phase
    train_step(strategy, recipe, batches(), 0)
    strategy.step, strategy.phase = real_step, real_phase
    peak = max([peak, meter.peak(), *(x["peak_bytes"] for x in phase_peaks)])
    # parameters and optimizer state do not change between the two counts; each model's
    # gradients are those counted before its own step (the other model holds none then)
    grads = counts["D"]["grads"] + counts["G"]["grads"]
    row = {"strategy": name, "ran": strategy.name, "world_size": info.world_size, "rank": info.rank,
           "precision": args.precision, "params_G": numel["G"], "params_D": numel["D"],
           "params_bytes": counts["G"]["params"], "grads_bytes": grads,
           "optimizer_bytes": counts["G"]["optimizer"], "other_bytes": counts["G"]["other"],
           "master_bytes": counts["G"]["master"], "ema_bytes": counts["G"]["ema"],
           "idle_grads_bytes_at_G_step": counts["G"]["idle_grads"],
           "peak_bytes": peak, "baseline_bytes": baseline, "peak_kind": meter.kind, "phases": phase_peaks}
    if getattr(strategy, "zero_stage", None) is not None:
        row["zero_stage"] = strategy.zero_stage
    row["total_bytes"] = row["params_bytes"] + row["grads_bytes"] + row["optimizer_bytes"]
    row["total_with_ema_bytes"] = row["total_bytes"] + row["ema_bytes"]
    gathered = _gather(row)
    if info.is_main:
        Path(args.out).write_text(json.dumps({"rows": gathered, "env": environment(info)}))
    strategy.close()
    del strategy
    gdist.teardown()


def _gather(obj: Any) -> list:
    import torch.distributed as dist

    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ---- the sweep ------------------------------------------------------------------------------------
def run_job(args: argparse.Namespace, name: str, world_size: int, precision: str, tmp: Path) -> dict:
    out = tmp / f"{name}-w{world_size}-{precision}.json"
    script = str(Path(__file__).resolve())
    launch = [sys.executable, script] if world_size == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}", script]
    cmd = [*launch, "--child", name, "--out", str(out), "--precision", precision,
           "--batch-size", str(args.batch_size), *(["--config", args.config] if args.config else []),
           *(f"--set={o}" for o in args.overrides)]
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // world_size)))
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{name} on {world_size} process(es) failed (exit {proc.returncode}): {' '.join(cmd)}")
    return json.loads(out.read_text())


def summarise(jobs: list[dict]) -> list[dict]:
    """One row per (precision, world size, strategy): the largest rank's bytes, and the ratio
    to DDP's at the same precision and world size."""
    rows = []
    for job in jobs:
        ranks = job["rows"]
        worst = max(ranks, key=lambda r: r["total_bytes"])
        row = dict(worst)
        row.pop("rank")
        row["ranks"] = [{k: r[k] for k in ("rank", "params_bytes", "grads_bytes", "optimizer_bytes", "master_bytes",
                                            "ema_bytes", "other_bytes", "total_bytes", "peak_bytes", "phases")}
                        for r in ranks]
        rows.append(row)
    for row in rows:
        ddp = next((r for r in rows if r["strategy"] == "ddp" and r["world_size"] == row["world_size"]
                    and r["precision"] == row["precision"]), None)
        row["vs_ddp"] = round(row["total_bytes"] / ddp["total_bytes"], 4) if ddp else None
        row["vs_ddp_without_master"] = (round((row["total_bytes"] - row["master_bytes"]) / ddp["total_bytes"], 4)
                                        if ddp else None)
        row["vs_ddp_with_ema"] = round(row["total_with_ema_bytes"] / ddp["total_with_ema_bytes"], 4) if ddp else None
        row["peak_above_baseline_bytes"] = row["peak_bytes"] - row["baseline_bytes"]
    return rows


def phase_label(phase: dict) -> str:
    return phase["model"] + (" 2nd order" if phase["second_order"] else "")


def phase_table(rows: list[dict], mib: Any) -> list[str]:
    """Each phase's peak above its start (the largest rank's), the measured iteration's order."""
    labels = [phase_label(x) for x in rows[0]["phases"]]
    lines = ["", "What autograd saves in each phase of the measured iteration, MiB (the largest rank; each "
             "storage once, the rank's own parameters excluded): the activations, and under FSDP the "
             "gathered parameters the graph holds. \"2nd order\": a penalty phase (R1, path length) with "
             "its double backward. On a CPU the resident set keeps what earlier phases freed, so the "
             "per-phase resident peaks (in the JSON) mostly charge the first phase.", "",
             "| precision | world size | strategy | " + " | ".join(labels) + " | largest vs DDP's |",
             "|---|---:|---|" + "---:|" * (len(labels) + 1)]
    def largest(r: dict) -> list[int]:
        per_rank = [[x["saved_bytes"] for x in rank["phases"]] for rank in r["ranks"]]
        return [max(col) for col in zip(*per_rank)]
    for r in rows:
        ddp = next((d for d in rows if d["strategy"] == "ddp" and d["world_size"] == r["world_size"]
                    and d["precision"] == r["precision"]), None)
        ours = largest(r)
        ratio = f"{max(ours) / max(largest(ddp)):.3f}" if ddp else "-"
        lines.append(f"| {r['precision']} | {r['world_size']} | {r['strategy']} | "
                     + " | ".join(mib(v) for v in ours) + f" | {ratio} |")
    return lines


def markdown(result: dict) -> str:
    mib = lambda n: f"{n / 2**20:,.1f}"  # noqa: E731
    env = result["env"]
    with_ema = any(r.get("ema_bytes") for r in result["rows"])
    lines = [
        f"# Per-rank memory of G+D training state ({result['model']}, Adam)",
        "",
        f"`{result['command']}` on {env.get('device_name', env.get('device'))}, torch {env['versions'].get('torch')}, "
        f"deepspeed {env['versions'].get('deepspeed')}. G {result['params_G'] / 1e6:.1f} M and D "
        f"{result['params_D'] / 1e6:.1f} M parameters, {result['batch_size_per_rank']} images per rank.",
        "",
        "MiB held by the largest rank, just before each optimizer step, each storage counted once. "
        "params: what the parameters store on the rank; grads: each model's gradients before its "
        "step, with ZeRO's partitions and reduce buckets; optimizer: Adam's moments plus ZeRO's "
        "fp32 master partition, which is also shown alone (master). \"vs DDP\" divides "
        "params+grads+optimizer by DDP's at the same precision and world size (at world size 1 DDP "
        "is the plain single-process strategy). DDP also keeps the bucket of the model that is not "
        "stepping allocated (\"other\" at world size 2)."
        + (" ema: the fp32 EMA of G this rank keeps; \"vs DDP with EMA\" adds it on both sides." if with_ema else ""),
        "",
        "| precision | world size | strategy (ran) | params | grads | optimizer | master | params+grads+opt | vs DDP | "
        "vs DDP without master |" + (" ema | vs DDP with EMA |" if with_ema else "") + " other | peak (process) |"
        + (" peak above start |" if with_ema else ""),
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if with_ema else ""),
    ]
    for r in result["rows"]:
        ran = r["ran"] + (f" ZeRO-{r['zero_stage']}" if "zero_stage" in r else "")
        ema = f" {mib(r['ema_bytes'])} | {r['vs_ddp_with_ema']:.3f} |" if with_ema else ""
        lines.append(f"| {r['precision']} | {r['world_size']} | {r['strategy']} ({ran}) | {mib(r['params_bytes'])} | "
                     f"{mib(r['grads_bytes'])} | {mib(r['optimizer_bytes'])} | {mib(r['master_bytes'])} | "
                     f"{mib(r['total_bytes'])} | {r['vs_ddp']:.3f} | {r['vs_ddp_without_master']:.3f} |{ema} "
                     f"{mib(r['other_bytes'])} | {mib(r['peak_bytes'])} |"
                     + (f" {mib(r['peak_above_baseline_bytes'])} |" if with_ema else ""))
    if any(r.get("phases") for r in result["rows"]):
        lines += phase_table(result["rows"], mib)
    for target in result.get("targets", []):
        lines += ["", f"Target ({target['precision']}): {target['rule']} -> " + ", ".join(
            f"{k} {v['vs_ddp']:.3f} ({'met' if v['met'] else 'NOT met'})"
            + (f", with EMA {v['vs_ddp_with_ema']:.3f} ({'met' if v['met_with_ema'] else 'NOT met'})"
               if "vs_ddp_with_ema" in v else "") for k, v in target["results"].items())]
        for k, v in target["results"].items():
            row = next(r for r in result["rows"] if r["strategy"] == k and r["world_size"] == 2
                       and r["precision"] == target["precision"])
            if not v["met"] and row["master_bytes"]:
                lines.append(f"{k} keeps a separate fp32 master copy of its partition ({mib(row['master_bytes'])} MiB "
                             f"here); without it, it would hold {row['vs_ddp_without_master']:.3f}x DDP's bytes.")
    lines += ["", "Peak (process) is the resident-set high-water mark on a CPU (it includes the Python "
              "runtime and libraries, hence the large floor) or torch.cuda.max_memory_allocated on a GPU."
              + (" Peak above start subtracts the resident set before the models were built: the training "
                 "state plus the activations and temporaries of the largest phase (and allocator slack)."
                 if with_ema else "")]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> Optional[dict]:
    args = parse_args(argv)
    if args.child:
        child(args)
        return None
    if args.render:
        result = json.loads(Path(args.render).read_text())
        text = markdown(result)
        print(text)
        if args.md:
            Path(args.md).write_text(text)
        return result
    names = [s for s in args.strategies.split(",") if s]
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown:
        raise SystemExit(f"--strategies: unknown {unknown}; choose from {', '.join(STRATEGIES)}")
    sizes = [int(w) for w in args.world_sizes.split(",") if w]
    precisions = [x for x in args.precision.split(",") if x]
    with tempfile.TemporaryDirectory(prefix="gan_dist-memory-") as tmp:
        jobs = [run_job(args, name, w, prec, Path(tmp)) for prec in precisions for w in sizes for name in names]
    rows = summarise(jobs)
    result = {"benchmark": "memory", "command": "python benchmarks/memory.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "model": (args.config or "DCGAN 64x64 RGB, ngf=ndf=256") + (f" with {args.overrides}" if args.overrides else ""),
              "precisions": precisions, "batch_size_per_rank": args.batch_size,
              "params_G": rows[0]["params_G"], "params_D": rows[0]["params_D"],
              "env": jobs[-1]["env"], "rows": rows, "targets": []}
    for prec in precisions:
        two = {r["strategy"]: r for r in rows if r["world_size"] == 2 and r["precision"] == prec}
        if "ddp" in two:
            checked = {k: two[k] for k in ("fsdp", "zero3") if k in two}
            result["targets"].append({
                "precision": prec, "rule": "FSDP and ZeRO-3 on 2 ranks hold at most 0.55x of DDP's per-rank bytes",
                "results": {k: {"vs_ddp": r["vs_ddp"], "met": r["vs_ddp"] <= 0.55,
                                **({"vs_ddp_with_ema": r["vs_ddp_with_ema"], "met_with_ema": r["vs_ddp_with_ema"] <= 0.55}
                                   if r["ema_bytes"] else {})} for k, r in checked.items()}})
    text = markdown(result)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.md:
        Path(args.md).write_text(text)
    return result


if __name__ == "__main__":
    main()
