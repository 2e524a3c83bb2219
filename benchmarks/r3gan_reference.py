"""gan_dist's R3GAN iteration side by side with brownvc/R3GAN's own, in one process.

    python benchmarks/r3gan_reference.py --ref /path/to/R3GAN --model r3gan-cifar10 --batch-size 4 \
        --iters 2 --repeats 3 --threads 1

Both sides train the same architecture (the preset's widths, cardinalities and blocks) and batch
with the reference's recipe at its schedules' start: a D phase with the relativistic loss plus
R1 and R2 on every step (gamma / 2 each), then a G phase with the relativistic loss, Adam (0, 0.9),
one process; fp32 on both sides (`--precision fp32`), or each side's own mixed precision
(`--precision preset`: the reference's bf16 stages of the preset, gan_dist's bf16 autocast). The reference runs its `training/loss.py` R3GANLoss and the phase loop of
`training/training_loop.py` (rewritten here: its loop also loads data, all-reduces and writes
snapshots) on its CPU paths (`bias_act` and `upfirdn2d` reference implementations); gan_dist
runs `gan_dist.loop.train_step` with its defaults for a CPU (channels_last, matmul
convolutions on small grids). No augmentation and no G EMA on either side. Blocks of `--iters`
iterations alternate between the two (`--repeats` each, after one warm-up block), so both see
the same machine load. The reference checkout is imported from `--ref` only (it is not a
package); its `pkg_resources` import (only `parse_version`) is answered by `packaging` and its
`requests` import is stubbed: nothing is downloaded in this path. Results go to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# the reference's CIFAR10 / FFHQ-64 presets at the start of their schedules (train.py), with the
# G stages it runs in bf16 (`FP16Stages`; D's are the same resolutions)
RECIPES = {"r3gan-cifar10": {"gamma": 0.05, "lr": 2e-4, "beta2": 0.9, "bf16_stages": [-1, -2, -3]},
           "r3gan-ffhq64": {"gamma": 2.0, "lr": 2e-4, "beta2": 0.9, "bf16_stages": [-1, -2, -3, -4]}}


def gan_dist_side(model: str, batch: int, precision: str,
                  overrides: list[str]) -> tuple[Callable[[int], None], dict[str, Any]]:
    from gan_dist import distributed as gdist
    from gan_dist.build import setup_models, step_batches
    from gan_dist.loop import train_step
    from gan_dist.parallel import build_strategy

    r = RECIPES[model]
    cfg = common.build_config(model, batch, "fp32" if precision == "fp32" else "bf16", "none", True, False,
                              [f"reg.r1_gamma={r['gamma']}", f"reg.r2_gamma={r['gamma']}", "reg.d_every=1",
                               f"train.lr_g={r['lr']}", f"train.lr_d={r['lr']}", "train.beta1=0",
                               f"train.beta2={r['beta2']}", "ema.enabled=false", *overrides])
    info = gdist.init_distributed()
    strategy = build_strategy(info, cfg)
    recipe, spec, counts = setup_models(strategy, cfg)
    gen = torch.Generator().manual_seed(0)

    def real() -> torch.Tensor:
        return torch.rand(batch, cfg.model.channels, cfg.model.resolution, cfg.model.resolution, generator=gen) * 2 - 1

    def step(i: int) -> None:
        train_step(strategy, recipe, step_batches(cfg, spec, i, 0, 1, real, torch.device("cpu")), i)

    return step, {"params": counts, "cfg": cfg}


def import_reference(ref: Path) -> None:
    try:
        import pkg_resources  # noqa: F401
    except ImportError:  # setuptools without it: the reference only takes parse_version from it
        from packaging.version import parse as parse_version

        stub = types.ModuleType("pkg_resources")
        stub.parse_version = parse_version
        sys.modules["pkg_resources"] = stub
    sys.modules.setdefault("requests", types.ModuleType("requests"))  # imported by dnnlib, used to download
    sys.path.insert(0, str(ref))


def reference_side(ref: Path, model: str, cfg: Any, batch: int,
                   precision: str) -> tuple[Callable[[int], None], dict[str, Any]]:
    import_reference(ref)
    from training.loss import R3GANLoss
    from training.networks import Discriminator, Generator

    from gan_dist.models.r3gan import resolve

    p, R, C, r = resolve(cfg.model.r3gan), cfg.model.resolution, cfg.model.channels, RECIPES[model]
    if C != 3:
        raise SystemExit(f"the reference's networks are RGB only; {model} has model.channels={C}")
    g_bf16 = r["bf16_stages"] if precision == "preset" else []
    d_bf16 = [i + len(g_bf16) for i in g_bf16]  # train.py's mapping of G's stages to D's
    torch.manual_seed(0)
    G = Generator(NoiseDimension=p.z_dim, WidthPerStage=list(p.widths), CardinalityPerStage=list(p.cardinalities),
                  BlocksPerStage=list(p.blocks), ExpansionFactor=p.expansion, FP16Stages=g_bf16, c_dim=0,
                  img_resolution=R).train().requires_grad_(False)
    D = Discriminator(WidthPerStage=list(p.widths)[::-1], CardinalityPerStage=list(p.cardinalities)[::-1],
                      BlocksPerStage=list(p.blocks)[::-1], ExpansionFactor=p.expansion, FP16Stages=d_bf16,
                      c_dim=0, img_resolution=R).train().requires_grad_(False)
    loss = R3GANLoss(G, D)
    phases = [(name, module, torch.optim.Adam(module.parameters(), lr=r["lr"], betas=(0.0, r["beta2"]), eps=1e-8))
              for name, module in (("D", D), ("G", G))]
    gen = torch.Generator().manual_seed(0)
    c = torch.zeros(batch, 0)

    def step(i: int) -> None:
        for name, module, opt in phases:  # training_loop.py's phase loop, one round (D, then G)
            real = torch.rand(batch, C, R, R, generator=gen) * 2 - 1
            z = torch.randn(batch, p.z_dim, generator=gen)
            opt.zero_grad(set_to_none=True)
            module.requires_grad_(True)
            loss.accumulate_gradients(phase=name, real_img=real, real_c=c, gen_z=z, gamma=r["gamma"], gain=1)
            module.requires_grad_(False)
            params = [q for q in module.parameters() if q.grad is not None]
            flat = torch.cat([q.grad.flatten() for q in params])  # its all-reduce buffer (one process: no reduce)
            for q, g in zip(params, flat.split([q.numel() for q in params])):
                q.grad = g.reshape(q.shape)
            opt.step()

    counts = {"G": sum(q.numel() for q in G.parameters()), "D": sum(q.numel() for q in D.parameters())}
    return step, {"params": counts}


def timed(step: Callable[[int], None], first: int, n: int) -> float:
    t = time.perf_counter()
    for i in range(first, first + n):
        step(i)
    return time.perf_counter() - t


def write_markdown(result: dict[str, Any], path: Path) -> None:
    rows, prec = result["rows"], result["precision"]
    prec = prec if isinstance(prec, str) else "; ".join(f"{k}: {v}" for k, v in prec.items())
    lines = [f"# R3GAN: gan_dist vs the reference ({result['reference']['repo']} "
             f"{result['reference']['revision'][:7]}) on this CPU", "",
             f"`{result['command']}`", "",
             f"{result['model']}, batch {result['batch_size']}, precision {prec}, "
             f"{result['threads']} thread(s), one process; "
             f"{result['repeats']} interleaved blocks of {result['iters_per_block']} iterations each after a warm-up "
             f"block. Recipe: rpgan, R1 + R2 (gamma {result['recipe']['gamma']}) every D step, "
             f"Adam (0, {result['recipe']['betas'][1]}), lr {result['recipe']['lr']}; no EMA, no augmentation.", "",
             "| side | params G | params D | s per block | ms / iter (median) | img/s |", "|---|---|---|---|---|---|"]
    for name, row in rows.items():
        pc = result["params"][name]
        lines.append(f"| {name} | {pc['G']:,} | {pc['D']:,} | {', '.join(str(s) for s in row['s_per_block'])} "
                     f"| {row['ms_per_iter']} | {row['img_per_sec']} |")
    lines += ["", f"gan_dist / reference: **{result['speedup']}x** img/s.", ""]
    path.write_text("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ref", required=True, help="a checkout of brownvc/R3GAN")
    p.add_argument("--model", default="r3gan-cifar10", choices=list(RECIPES))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--iters", type=int, default=2, help="iterations per timed block")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--precision", choices=["fp32", "preset"], default="fp32",
                   help="fp32 on both sides, or each side's mixed precision for the preset: the reference's "
                        "bf16 stages (its FP16Stages), gan_dist's train.precision=bf16 (autocast, every stage)")
    p.add_argument("--revision", default=None, help="the reference's commit, when --ref is not a git work tree")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for both sides' sizes, e.g. model.r3gan.widths=[64,64,64,64]")
    p.add_argument("--out", default=None, help="JSON result (default: benchmarks/results/r3gan_reference_cpu.json)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ref = Path(args.ref).resolve()
    revision = args.revision or subprocess.run(["git", "-C", str(ref), "rev-parse", "HEAD"], capture_output=True,
                                               text=True).stdout.strip()

    ours, ours_info = gan_dist_side(args.model, args.batch_size, args.precision, args.overrides)
    theirs, theirs_info = reference_side(ref, args.model, ours_info.pop("cfg"), args.batch_size, args.precision)
    sides = {"gan_dist": ours, "reference": theirs}
    seconds: dict[str, list[float]] = {k: [] for k in sides}
    for step in sides.values():  # warm-up block (allocations, first-iteration paths)
        timed(step, 0, args.iters)
    it = args.iters
    for _ in range(args.repeats):
        for name, step in sides.items():
            seconds[name].append(timed(step, it, args.iters))
        it += args.iters
    rows = {}
    for name, secs in seconds.items():
        med = statistics.median(secs)
        rows[name] = {"s_per_block": [round(s, 2) for s in secs], "ms_per_iter": round(1000 * med / args.iters, 1),
                      "img_per_sec": round(args.batch_size * args.iters / med, 3)}
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "reference": {"repo": "brownvc/R3GAN", "revision": revision},
        "model": args.model, "overrides": args.overrides, "batch_size": args.batch_size, "iters_per_block": args.iters,
        "repeats": args.repeats, "threads": args.threads,
        "precision": ("fp32" if args.precision == "fp32" else
                      {"gan_dist": "bf16 autocast", "reference": f"bf16 stages {RECIPES[args.model]['bf16_stages']} of G "
                                                                "(and D's at the same resolutions), fp32 elsewhere"}),
        "recipe": {"loss": "rpgan", "gamma": RECIPES[args.model]["gamma"], "r1_r2_every": 1,
                   "lr": RECIPES[args.model]["lr"], "betas": [0, RECIPES[args.model]["beta2"]]},
        "params": {"gan_dist": ours_info["params"], "reference": theirs_info["params"]},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__},
        "rows": rows,
        "speedup": round(rows["gan_dist"]["img_per_sec"] / rows["reference"]["img_per_sec"], 3),
    }
    out = Path(args.out) if args.out else RESULTS / ("r3gan_reference_cpu.json" if args.precision == "fp32"
                                                     else "r3gan_reference_cpu_mixed.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    write_markdown(result, out.with_suffix(".md"))


if __name__ == "__main__":
    main()
