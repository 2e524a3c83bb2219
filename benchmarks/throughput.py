"""Images per second per GPU, MFU, peak memory and bytes communicated of gan_dist's training step.

    python benchmarks/throughput.py --model dcgan-64 --batch-size 64            # a sweep on this device
    python benchmarks/throughput.py --precision bf16 --channels-last --no-compile --json out.json --plot out.png
    torchrun --nproc_per_node 8 benchmarks/throughput.py --model dcgan-64 --batch-size 128   # 8 GPUs
    python benchmarks/throughput.py --scaling 1,2,4,8 --precision bf16 --json scaling.json   # 1..8 processes

Each row times the full G+D iteration (`train_step`, with the strategy built by
`build_strategy` exactly as the trainer does) after a warm-up: the median of `--repeats`
repeats of `--iters` iterations. What is not fixed on the command line is swept: precision
(fp32, bf16; fp16 too on a GPU), channels_last on and off, torch.compile on and off, and the
strategies that apply to the world size (none with one process; ddp, fsdp, deepspeed with
several). With one process the PyTorch DCGAN example's loop (benchmarks/seed_loop.py) is timed
too, on the same model, batch and device, and every row gets its speed-up over it.

Launched with several processes (torchrun, accelerate launch, srun) it measures that world
size: img/s in total and per GPU (per process on a CPU). `--scaling 1,2,...` starts itself once
per world size with torchrun on this node and reports the scaling efficiency.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.seed_loop import SeedLoopBench  # noqa: E402
from gan_dist.config import CHOICES  # noqa: E402
from gan_dist.parallel.base import matmul_convs_wanted  # noqa: E402

STRATEGIES = ("none", "ddp", "fsdp", "deepspeed")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default="dcgan-64", choices=list(common.MODELS))
    p.add_argument("--batch-size", type=int, default=64, help="images per process per micro-batch")
    p.add_argument("--precision", help="comma-separated: fp32,bf16,fp16 (default: fp32,bf16; +fp16 on a GPU)")
    p.add_argument("--strategy", help="comma-separated, or 'all' (default: none with one process; "
                                      "ddp,fsdp,deepspeed with several)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="fix channels_last on or off (default: both)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="fix torch.compile on or off (default: both)")
    p.add_argument("--matmul-conv", default="auto",
                   help="comma-separated values of train.matmul_conv to sweep: auto,always,never (default: auto)")
    p.add_argument("--data", default="synthetic", choices=["synthetic", "shards"],
                   help="synthetic: random batches already on the device; shards: the trainer's loader "
                        "on data.urls (default: the demo digits, 1x32x32: use --model dcgan-32)")
    p.add_argument("--recipe", default="plain",
                   help=f"comma-separated recipes to time side by side: {', '.join(RECIPES)} (default: plain)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every row, e.g. parallel.fsdp.reshard_after_forward=false")
    p.add_argument("--seed-loop", action=argparse.BooleanOptionalAction, default=True,
                   help="time the DCGAN example's loop too (one process, DCGAN models only)")
    p.add_argument("--interleave", action="store_true",
                   help="prepare all rows first and time their repeats round-robin (robust ratios on a "
                        "busy machine; memory then counts earlier rows' resident state)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--peak-size", type=int, default=None, help="matmul size for the peak (default 2048 CPU, 8192 GPU)")
    p.add_argument("--scaling", help="comma-separated world sizes, e.g. 1,2: one torchrun per size on this node")
    p.add_argument("--json", help="write the result (environment, peaks, rows) as JSON here")
    p.add_argument("--md", help="write the Markdown table here")
    p.add_argument("--plot", help="write a PNG chart here")
    args = p.parse_args(argv)
    if args.batch_size <= 0 or min(args.warmup, args.repeats - 1, args.iters - 1) < 0:
        p.error("--batch-size, --repeats and --iters must be positive, --warmup >= 0")
    return args


# recipes to time side by side (--recipe): the overrides each adds to a row
RECIPES = {
    "plain": [],
    "hinge": ["train.loss=hinge"],
    "r1": ["reg.r1_gamma=1", "reg.d_every=1"],  # R1 in every step's Dmain backward
    "r1-lazy16": ["reg.r1_gamma=1", "reg.d_every=16"],  # StyleGAN2's lazy R1: a Dreg phase every 16 steps
    # every D call's images augmented (real and fake, D and G phases); ADA at p = 0.5 (every op
    # drawn, about half applied) so that its cost is that of a run well into its adaptation
    "diffaugment": ["augment.kind=diffaugment"],
    "ada": ["augment.kind=ada", "augment.p=0.5"],
}


def recipe_costs(rows: list[dict[str, Any]]) -> str:
    """Each recipe's iteration time relative to the plain recipe's row with the same settings."""
    lines = []
    for r in rows:
        if r.get("recipe", "plain") == "plain" or r["impl"] != "gan_dist":
            continue
        key = lambda x: (x["strategy"], x["precision"], x["channels_last"], x["compile"], x["matmul_conv"])  # noqa: E731
        plain = next((p for p in rows if p.get("recipe") == "plain" and key(p) == key(r)), None)
        if plain is not None:
            r["cost_vs_plain"] = round(plain["img_per_sec"] / r["img_per_sec"], 3)
            lines.append(f"- {r['label']}: {r['cost_vs_plain']:.2f}x the plain iteration's time")
    return "Recipe cost per iteration (side by side in this run):\n" + "\n".join(lines) if lines else ""


def sweep(args: argparse.Namespace, world_size: int,
          device: torch.device) -> list[tuple[str, str, bool, bool, str]]:
    """(strategy, precision, channels_last, compile, matmul_conv) of every gan_dist row."""
    if args.strategy in (None, ""):
        strategies = ["none"] if world_size == 1 else ["ddp", "fsdp", "deepspeed"]
    elif args.strategy == "all":
        strategies = ["none", "fsdp", "deepspeed"] if world_size == 1 else ["ddp", "fsdp", "deepspeed"]
    else:
        strategies = [s.strip() for s in args.strategy.split(",") if s.strip()]
    for s in strategies:
        if s not in STRATEGIES:
            raise SystemExit(f"--strategy {s!r} is not one of: {', '.join(STRATEGIES)}, all")
    if args.precision:
        precisions = [x.strip() for x in args.precision.split(",") if x.strip()]
    else:
        precisions = ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    for x in precisions:
        if x not in common.PEAK_DTYPES:
            raise SystemExit(f"--precision {x!r} is not one of: {', '.join(common.PEAK_DTYPES)}")
    cl = [False, True] if args.channels_last is None else [args.channels_last]
    comp = [False, True] if args.compile is None else [args.compile]
    matmul = [x.strip() for x in args.matmul_conv.split(",") if x.strip()]
    allowed = CHOICES["train.matmul_conv"]
    for x in matmul:
        if x not in allowed:
            raise SystemExit(f"--matmul-conv {x!r} is not one of: {', '.join(allowed)}")
    combos, seen = [], set()
    for s, x, c, k, m in itertools.product(strategies, precisions, cl, comp, matmul):
        # values of train.matmul_conv that come to the same (e.g. auto and never under compile): one row
        effective = matmul_convs_wanted(SimpleNamespace(matmul_conv=m, compile=k), device)
        if (s, x, c, k, effective) not in seen:
            seen.add((s, x, c, k, effective))
            combos.append((s, x, c, k, m))
    return combos


def run(args: argparse.Namespace) -> Optional[dict[str, Any]]:
    """One world size: the world the launcher made. Returns the result on rank 0."""
    from gan_dist.distributed import init_distributed, teardown
    from gan_dist.launcher import configure_threads

    info = init_distributed()
    common.COMM.install()  # before any strategy: DeepSpeed looks the collectives up once
    combos = sweep(args, info.world_size, info.device)
    first = common.build_config(args.model, args.batch_size, combos[0][1], combos[0][0], combos[0][2],
                                combos[0][3], args.overrides, combos[0][4]) if combos else None
    if first is not None:
        configure_threads(first, info.local_world_size, info.launcher)
    env = common.environment(info)
    other = common.OtherLoad()
    spec = common.TimingSpec(args.warmup, args.repeats, args.iters)
    timeline = common.Timeline(common.Clock(info.device))

    benches: list[common.Bench] = []
    skipped: list[dict[str, str]] = []
    if args.seed_loop and info.world_size == 1:
        try:
            cfg = common.build_config(args.model, args.batch_size, "fp32", "none", False, False, args.overrides)
            if cfg.model.arch != "dcgan":  # the example's loop is DCGAN's: its G takes (N, nz, 1, 1) noise
                raise ValueError(f"the DCGAN example's loop has no {cfg.model.arch} (--model {args.model})")
            benches.append(SeedLoopBench(cfg, info, args.data, timeline, args.model))
        except ValueError as exc:
            skipped.append({"label": "seed_loop fp32", "reason": str(exc)})
    recipes = [x.strip() for x in args.recipe.split(",") if x.strip()]
    for x in recipes:
        if x not in RECIPES:
            raise SystemExit(f"--recipe {x!r} is not one of: {', '.join(RECIPES)}")
    for (strategy, precision, channels_last, compiled, matmul_conv), recipe in itertools.product(combos, recipes):
        cfg = common.build_config(args.model, args.batch_size, precision, strategy, channels_last, compiled,
                                  [*args.overrides, *RECIPES[recipe]], matmul_conv)
        label = f"gan_dist {strategy} {precision}" + (" channels_last" if channels_last else "") + (
            " compile" if compiled else "") + f" matmul_conv={matmul_conv}" + f" recipe={recipe}"
        try:
            bench = common.GanDistBench(cfg, info, args.data, timeline, args.model)
            bench.row["recipe"] = recipe
            if recipe != "plain":
                bench.row["is_default"] = False
                bench.row["label"] = common.row_label(bench.row) + f" [{recipe}]"
            benches.append(bench)
        except ImportError as exc:  # a strategy module or its package is not there (yet)
            skipped.append({"label": label, "reason": f"not available: {exc}"})
        except (ValueError, RuntimeError) as exc:  # e.g. a combination the strategy refuses
            skipped.append({"label": label, "reason": str(exc).splitlines()[0]})

    dtypes = sorted({"fp32", "bf16"} | {b.row["precision"] for b in benches})
    peaks = common.measure_peaks(info.device, dtypes, args.peak_size)
    rows = []
    for bench in benches:  # one at a time unless interleaved: memory is then the row's own
        if not args.interleave:
            common.run_benches([bench], spec)
    if args.interleave:
        common.run_benches(benches, spec, interleave=True)
    peaks = common.measure_peaks(info.device, dtypes, args.peak_size, before=peaks)
    for bench in benches:
        if bench.failed is not None:
            skipped.append({"label": bench.row["label"], "reason": bench.failed})
            continue
        per_rank = common.gather(common.rank_summary(bench, spec))
        rows.append(common.make_row(bench, per_rank, peaks, spec))
    common.add_seed_ratios(rows)
    summary = recipe_costs(rows)
    env["loadavg_end"] = common.loadavg()
    env["other_processes_cpu_cores"] = other.cores()
    result = {"benchmark": "throughput", "env": env, "peak_flops_per_sec": peaks, "rows": rows,
              "skipped": skipped, "timing": vars(spec), **({"summary": summary} if summary else {})}
    is_main = info.is_main
    teardown()
    return result if is_main else None


def child_argv(argv: Sequence[str]) -> list[str]:
    """This command line without --scaling and the output options (the parent writes those)."""
    out, skip = [], False
    drop = ("--scaling", "--json", "--md", "--plot")
    for a in argv:
        if skip:
            skip = False
            continue
        if a in drop:
            skip = True
            continue
        if a.startswith(tuple(d + "=" for d in drop)):
            continue
        out.append(a)
    return out


def run_scaling(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    """One child run per world size on this node (torchrun for more than one), merged."""
    sizes = [int(x) for x in args.scaling.split(",") if x.strip()]
    if not sizes or min(sizes) < 1:
        raise SystemExit(f"--scaling {args.scaling!r}: give world sizes >= 1, e.g. 1,2")
    script = str(Path(__file__).resolve())
    results = []
    with tempfile.TemporaryDirectory(prefix="gan_dist-scaling-") as tmp:
        for W in sizes:
            out = Path(tmp) / f"w{W}.json"
            launch = [sys.executable, script] if W == 1 else [
                sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={W}", script]
            cmd = [*launch, *child_argv(argv), "--json", str(out)]
            print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1"))
            if proc.returncode != 0:
                raise SystemExit(f"world size {W} failed (exit {proc.returncode}): {' '.join(cmd)}")
            results.append(json.loads(out.read_text()))
    rows = [r for res in results for r in res["rows"]]
    add_scaling(rows)
    envs = [res["env"] for res in results]
    others = [e.get("other_processes_cpu_cores") for e in envs]
    env = dict(envs[-1], world_size=sizes, threads_per_process=[e["threads_per_process"] for e in envs],
               loadavg_start=envs[0]["loadavg_start"],
               other_processes_cpu_cores=None if None in others else max(others))
    peaks = {f"w{res['env']['world_size']}_{k}": v for res in results for k, v in res["peak_flops_per_sec"].items()}
    return {"benchmark": "throughput-scaling", "env": env, "peak_flops_per_sec": peaks, "rows": rows,
            "skipped": [s for res in results for s in res["skipped"]],
            "per_world_size": [{"world_size": res["env"]["world_size"], "env": res["env"],
                                "peak_flops_per_sec": res["peak_flops_per_sec"]} for res in results]}


def add_scaling(rows: list[dict[str, Any]]) -> None:
    """Throughput per unit of hardware at W over the same at 1 process, same settings.

    On a GPU node each process has its own GPU: per-GPU img/s over the 1-GPU img/s. On a CPU
    all processes share the same cores, so the total img/s over the 1-process img/s.
    """
    def key(r: dict[str, Any]) -> tuple:
        return (r["impl"], r["model"], r["batch_size"], r["precision"], r["channels_last"], r["compile"],
                r["data"])

    ones = [r for r in rows if r["world_size"] == 1 and r["impl"] == "gan_dist"]
    for r in rows:
        if r["impl"] != "gan_dist":
            continue
        # the same strategy with one process, else no wrapper at all (ddp with one process is none)
        same = [b for b in ones if key(b) == key(r)]
        b = next((b for b in same if b["strategy"] == r["strategy"]), None) or next(
            (b for b in same if b["strategy"] == "none"), None)
        if b is None:
            continue
        r["scaling_baseline"] = b["label"]
        per_gpu = r["mem_kind"].startswith("cuda")
        ratio = (r["img_per_sec_per_gpu"] / b["img_per_sec_per_gpu"] if per_gpu
                 else r["img_per_sec"] / b["img_per_sec"])
        r["scaling_efficiency"] = round(ratio, 3)


def scaling_markdown(result: dict[str, Any]) -> str:
    lines = ["| row | W | img/s | img/s per GPU/process | efficiency | comm MB/iter (x min) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        if r["impl"] != "gan_dist":
            continue
        comm = common.comm_cell(r)
        eff = "-" if r["scaling_efficiency"] is None else f"{100 * r['scaling_efficiency']:.0f}%"
        lines.append(f"| {r['label']} | {r['world_size']} | {r['img_per_sec']:.1f} | {r['img_per_sec_per_gpu']:.1f} "
                     f"| {eff} | {comm} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> Optional[dict[str, Any]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.scaling:
        result = run_scaling(args, argv)
        text = common.write_outputs(result, args.json, None, args.plot)
        text += "\n" + scaling_markdown(result)
        if args.md:
            Path(args.md).write_text(text)
        print(text)
        return result
    result = run(args)
    if result is not None:
        print(common.write_outputs(result, args.json, args.md, args.plot))
    return result


if __name__ == "__main__":
    main()
