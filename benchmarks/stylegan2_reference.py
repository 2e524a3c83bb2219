"""gan_dist's StyleGAN2 iteration side by side with stylegan2-ada-pytorch's own, in one process.

    python benchmarks/stylegan2_reference.py --ref /path/to/stylegan2-ada-pytorch --model stylegan2-64 \
        --batch-size 8 --iters 16 --repeats 3

Both sides train the same architecture and batch with the reference's recipe: Gmain every step,
Greg (path length, weight 2, half batch) every 4, Dmain every step, Dreg (R1) every 16, Adam (0,
0.99) with the lazy-regularisation rescaling, style mixing 0.9, fp32, one process. The reference
runs its `training/loss.py` StyleGAN2Loss and the phase loop of `training/training_loop.py`
(rewritten here: its loop also loads data and writes snapshots) on its reference (non-CUDA)
operations; no augmentation, no G EMA on either side. Blocks of `--iters` iterations alternate
between the two (`--repeats` each, after one warm-up block), so both see the same machine load.
`--precision fp32,bf16` adds a gan_dist row in bf16 autocast (its CPU default), timed in the same
rotation; the reference stays fp32, the only precision its CPU path has. The reference checkout is imported from `--ref` only (it cannot be installed here; its `requests`
import is stubbed, it downloads nothing in this path). Results go to benchmarks/results/.
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
R1_GAMMA, G_EVERY, D_EVERY, LR = 0.0064, 4, 16, 0.0025


def gan_dist_side(model: str, batch: int, overrides: list[str],
                  precision: str = "fp32") -> tuple[Callable[[int], None], dict[str, Any]]:
    from gan_dist import distributed as gdist
    from gan_dist.build import setup_models, step_batches
    from gan_dist.loop import train_step
    from gan_dist.parallel import build_strategy

    cfg = common.build_config(model, batch, precision, "none", False, False,
                              [f"reg.r1_gamma={R1_GAMMA}", f"reg.d_every={D_EVERY}", f"train.lr_g={LR}",
                               f"train.lr_d={LR}", "train.beta1=0", "train.beta2=0.99", "ema.enabled=false",
                               *overrides])
    info = gdist.init_distributed()
    strategy = build_strategy(info, cfg)
    recipe, spec, counts = setup_models(strategy, cfg)
    gen = torch.Generator().manual_seed(0)

    def real() -> torch.Tensor:
        return torch.rand(batch, cfg.model.channels, cfg.model.resolution, cfg.model.resolution, generator=gen) * 2 - 1

    def step(i: int) -> None:
        train_step(strategy, recipe, step_batches(cfg, spec, i, 0, 1, real, torch.device("cpu")), i)

    return step, {"params": counts, "cfg": cfg}


def reference_side(ref: Path, cfg: Any, batch: int) -> tuple[Callable[[int], None], dict[str, Any]]:
    sys.modules.setdefault("requests", types.ModuleType("requests"))  # imported by dnnlib, used to download
    sys.path.insert(0, str(ref))
    from training.loss import StyleGAN2Loss
    from training.networks import Discriminator, Generator

    from gan_dist.models.stylegan2 import sizes

    s, sg, R, C = sizes(cfg.model.stylegan2), cfg.model.stylegan2, cfg.model.resolution, cfg.model.channels
    torch.manual_seed(0)
    G = Generator(z_dim=sg.z_dim, c_dim=0, w_dim=sg.w_dim, img_resolution=R, img_channels=C,
                  mapping_kwargs=dict(num_layers=s["mapping_layers"]),
                  synthesis_kwargs=dict(channel_base=s["channel_base"], channel_max=s["channel_max"],
                                        conv_clamp=s["conv_clamp"])).train().requires_grad_(False)
    D = Discriminator(c_dim=0, img_resolution=R, img_channels=C, channel_base=s["channel_base"],
                      channel_max=s["channel_max"], conv_clamp=s["conv_clamp"],
                      epilogue_kwargs=dict(mbstd_group_size=s["mbstd_group"])).train().requires_grad_(False)
    loss = StyleGAN2Loss(torch.device("cpu"), G.mapping, G.synthesis, D, r1_gamma=R1_GAMMA, style_mixing_prob=0.9,
                         pl_weight=2.0)
    phases = []
    for name, module, k in (("G", G, G_EVERY), ("D", D, D_EVERY)):
        ratio = k / (k + 1)
        opt = torch.optim.Adam(module.parameters(), lr=LR * ratio, betas=(0.0, 0.99 ** ratio), eps=1e-8)
        phases += [(name + "main", module, opt, 1), (name + "reg", module, opt, k)]
    gen = torch.Generator().manual_seed(0)
    c = torch.zeros(batch, 0)

    def step(i: int) -> None:
        real = torch.rand(batch, C, R, R, generator=gen) * 2 - 1
        for name, module, opt, every in phases:  # training_loop.py's phase loop, one round
            if i % every:
                continue
            z = torch.randn(batch, sg.z_dim, generator=gen)
            opt.zero_grad(set_to_none=True)
            module.requires_grad_(True)
            loss.accumulate_gradients(phase=name, real_img=real, real_c=c, gen_z=z, gen_c=c, sync=True, gain=every)
            module.requires_grad_(False)
            for p in module.parameters():
                if p.grad is not None:
                    torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
            opt.step()

    counts = {"G": sum(p.numel() for p in G.parameters()), "D": sum(p.numel() for p in D.parameters())}
    return step, {"params": counts}


def timed(step: Callable[[int], None], first: int, n: int) -> float:
    t = time.perf_counter()
    for i in range(first, first + n):
        step(i)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ref", required=True, help="a checkout of NVlabs/stylegan2-ada-pytorch")
    p.add_argument("--model", default="stylegan2-64", choices=[m for m in common.MODELS if m.startswith("stylegan2")])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--iters", type=int, default=16, help="iterations per timed block (a multiple of 16: every phase)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default="fp32",
                   help="comma-separated precisions of gan_dist's rows, e.g. fp32,bf16 (the reference runs "
                        "fp32 only: its CPU path has no other precision); the first must be fp32")
    p.add_argument("--revision", default=None, help="the reference's commit, when --ref is not a git work tree")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for both sides' sizes, e.g. model.stylegan2.channel_max=64")
    p.add_argument("--out", default=None, help="JSON result (default: benchmarks/results/stylegan2_reference_cpu.json)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ref = Path(args.ref).resolve()
    revision = args.revision or subprocess.run(["git", "-C", str(ref), "rev-parse", "HEAD"], capture_output=True,
                                               text=True).stdout.strip()

    precisions = [x.strip() for x in args.precision.split(",") if x.strip()]
    if not precisions or precisions[0] != "fp32" or not set(precisions) <= {"fp32", "bf16"}:
        raise SystemExit(f"--precision {args.precision!r}: give fp32 first, then optionally bf16")
    sides: dict[str, Callable[[int], None]] = {}
    infos: dict[str, dict[str, Any]] = {}
    for prec in precisions:
        name = "gan_dist" if prec == "fp32" else f"gan_dist {prec}"
        sides[name], infos[name] = gan_dist_side(args.model, args.batch_size, args.overrides, prec)
    ours_info = infos["gan_dist"]
    theirs, theirs_info = reference_side(ref, ours_info.pop("cfg"), args.batch_size)
    sides["reference"] = theirs
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
        rows[name] = {"s_per_block": [round(s, 3) for s in secs], "ms_per_iter": round(1000 * med / args.iters, 1),
                      "img_per_sec": round(args.batch_size * args.iters / med, 3)}
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "reference": {"repo": "NVlabs/stylegan2-ada-pytorch", "revision": revision},
        "model": args.model, "overrides": args.overrides, "batch_size": args.batch_size, "iters_per_block": args.iters,
        "repeats": args.repeats, "threads": args.threads, "precision": "fp32",
        "gan_dist_precisions": precisions, "reference_precision": "fp32 (its only precision on a CPU)",
        "recipe": {"r1_gamma": R1_GAMMA, "d_reg_every": D_EVERY, "pl_weight": 2.0, "g_reg_every": G_EVERY,
                   "style_mixing": 0.9, "lr": LR, "betas": [0, 0.99]},
        "params": {"gan_dist": ours_info["params"], "reference": theirs_info["params"]},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__},
        "rows": rows,
        "speedup": round(rows["gan_dist"]["img_per_sec"] / rows["reference"]["img_per_sec"], 3),
        "speedups": {name: round(rows[name]["img_per_sec"] / rows["reference"]["img_per_sec"], 3)
                     for name in rows if name != "reference"},
    }
    out = Path(args.out) if args.out else RESULTS / "stylegan2_reference_cpu.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
