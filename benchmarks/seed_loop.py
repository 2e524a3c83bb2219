"""The training step of the PyTorch DCGAN example, timed side by side with gan_dist's.

    python benchmarks/seed_loop.py --model dcgan-64 --batch-size 64 --json benchmarks/results/seed_loop_cpu.json

`SeedLoop.step` is the body of the loop in pytorch/examples dcgan/main.py: fp32, a sigmoid
at the end of D and BCELoss, separate backwards for the real and the fake half, the G update
through a D whose weight gradients are computed and thrown away, and `.item()` for the printed
statistics every iteration. It runs on gan_dist's DCGAN (the same weights) with a sigmoid head,
on the same batches and device as gan_dist's rows: gan_dist in fp32 (same arithmetic as the
example) and with its default settings. The timed repeats of the three go round-robin, so a
change of load hits them alike and the ratios hold.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn, optim  # noqa: E402

from benchmarks import common  # noqa: E402
from gan_dist.config import Config  # noqa: E402
from gan_dist.distributed import DistInfo  # noqa: E402

real_label = 1.0
fake_label = 0.0


class SeedLoop:
    """G, D (+ sigmoid), BCELoss and the two Adam optimizers of the DCGAN example."""

    def __init__(self, cfg: Config, device: torch.device) -> None:
        from gan_dist.models import build_models

        G, D = build_models(cfg.model, cfg.run.seed)
        self.device = device
        self.nz = cfg.model.dcgan.nz
        self.netG = G.to(device)
        self.netD = nn.Sequential(D, nn.Sigmoid()).to(device)
        self.criterion = nn.BCELoss()
        self.optimizerD = optim.Adam(self.netD.parameters(), lr=cfg.train.lr_d, betas=(cfg.train.beta1, 0.999))
        self.optimizerG = optim.Adam(self.netG.parameters(), lr=cfg.train.lr_g, betas=(cfg.train.beta1, 0.999))
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # as the example does

    def step(self, data: torch.Tensor) -> tuple[float, float, float, float, float]:
        netD, netG, criterion, device, nz = self.netD, self.netG, self.criterion, self.device, self.nz
        ############################
        # (1) Update D network: maximize log(D(x)) + log(1 - D(G(z)))
        ###########################
        # train with real
        netD.zero_grad()
        real_cpu = data.to(device)
        batch_size = real_cpu.size(0)
        label = torch.full((batch_size,), real_label, dtype=real_cpu.dtype, device=device)

        output = netD(real_cpu)
        errD_real = criterion(output, label)
        errD_real.backward()
        D_x = output.mean().item()

        # train with fake
        noise = torch.randn(batch_size, nz, 1, 1, device=device)
        fake = netG(noise)
        label.fill_(fake_label)
        output = netD(fake.detach())
        errD_fake = criterion(output, label)
        errD_fake.backward()
        D_G_z1 = output.mean().item()
        errD = errD_real + errD_fake
        self.optimizerD.step()

        ############################
        # (2) Update G network: maximize log(D(G(z)))
        ###########################
        netG.zero_grad()
        label.fill_(real_label)  # fake labels are real for generator cost
        output = netD(fake)
        errG = criterion(output, label)
        errG.backward()
        D_G_z2 = output.mean().item()
        self.optimizerG.step()
        return errD.item(), errG.item(), D_x, D_G_z1, D_G_z2  # what the example prints


class SeedLoopBench(common.Bench):
    """The example's step as a benchmark row (one process; fp32 whatever the config says)."""

    impl = "seed_loop"

    def __init__(self, cfg: Config, info: DistInfo, data_kind: str, timeline: common.Timeline, model: str) -> None:
        if info.world_size != 1:
            raise ValueError("the seed loop is single-process")
        t = cfg.train
        if t.grad_accum != 1 or t.d_steps != 1:
            raise ValueError("the seed loop has one D step and no gradient accumulation "
                             "(train.grad_accum=1, train.d_steps=1)")
        super().__init__(cfg, info, data_kind, timeline)
        self.row = common.describe(cfg, info, model, data_kind)
        self.row.update(impl=self.impl, strategy="none", precision="fp32", channels_last=False, compile=False,
                        matmul_conv=False, is_default=False)
        self.row["label"] = common.row_label(self.row)
        self.loop: Optional[SeedLoop] = None
        self.data: Any = None

    def setup(self) -> None:
        self.loop = SeedLoop(self.cfg, self.device)
        tl = self.timeline
        # the split: D from the start of the step to D's update, G from there to G's update
        self.loop.optimizerD.register_step_pre_hook(lambda *a: tl.mark("opt"))
        self.loop.optimizerD.register_step_post_hook(lambda *a: tl.mark("G"))
        self.loop.optimizerG.register_step_pre_hook(lambda *a: tl.mark("opt"))
        self.loop.optimizerG.register_step_post_hook(lambda *a: tl.mark("other"))
        self.data = common.real_source(self.cfg, self.info, self.data_kind)

    def next_batches(self) -> torch.Tensor:
        return next(self.data)

    def step(self, data: torch.Tensor) -> None:
        self.timeline.mark("D")
        self.loop.step(data)

    def count_flops(self) -> int:
        m, B = self.cfg.model, self.cfg.train.batch_size
        loop = SeedLoop(self.cfg, self.device)
        real = torch.rand(B, m.channels, m.resolution, m.resolution, device=self.device) * 2 - 1
        return common.count_flops(lambda: loop.step(real))

    def close(self) -> None:
        common.close_source(self.data)
        self.data = None
        self.loop = None


def round_ratios(seed: dict[str, Any], row: dict[str, Any]) -> list[float]:
    """Seed-loop time over the row's time, round by round: the repeats of a round ran one after
    the other, so a change of machine speed between rounds cancels out of each ratio."""
    return [round(a / b, 3) for a, b in zip(seed["ms_per_iter_repeats"], row["ms_per_iter_repeats"])]


def describe_rounds(by_round: dict[str, list[float]]) -> str:
    lines = []
    for key, ratios in by_round.items():
        lines.append(f"{key}, round by round: median {statistics.median(ratios):.2f}x, "
                     f"range {min(ratios):.2f}-{max(ratios):.2f}x over {len(ratios)} rounds")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dcgan-64", choices=list(common.MODELS))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--data", default="synthetic", choices=["synthetic", "shards"])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for all rows, e.g. model.dcgan.ngf=16 (repeatable)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--peak-size", type=int, default=None, help="matmul size for the peak (default 2048 CPU, 8192 GPU)")
    p.add_argument("--json", help="write the rows as JSON here")
    p.add_argument("--md", help="write a Markdown table here")
    args = p.parse_args(argv)

    from gan_dist.config import TrainConfig
    from gan_dist.distributed import init_distributed, teardown
    from gan_dist.launcher import configure_threads

    info = init_distributed()
    if info.world_size != 1:
        raise SystemExit("seed_loop.py runs one process; use throughput.py for several")
    d = TrainConfig()
    base = common.build_config(args.model, args.batch_size, "fp32", "none", False, False, args.overrides)
    configure_threads(base, info.local_world_size, info.launcher)
    env = common.environment(info)
    other = common.OtherLoad()
    spec = common.TimingSpec(args.warmup, args.repeats, args.iters)
    timeline = common.Timeline(common.Clock(info.device))
    common.COMM.install()
    benches = [
        SeedLoopBench(base, info, args.data, timeline, args.model),
        common.GanDistBench(base, info, args.data, timeline, args.model),
        common.GanDistBench(common.build_config(args.model, args.batch_size, d.precision, "auto", d.channels_last,
                                                d.compile, args.overrides, d.matmul_conv),
                            info, args.data, timeline, args.model),
    ]
    dtypes = sorted({"fp32", "bf16", d.precision})
    peaks = common.measure_peaks(info.device, dtypes, args.peak_size)
    common.run_benches(benches, spec, interleave=True)
    peaks = common.measure_peaks(info.device, dtypes, args.peak_size, before=peaks)
    for b in benches:
        if b.failed is not None:
            raise SystemExit(f"{b.row['label']}: {b.failed}")
    rows = [common.make_row(b, [common.rank_summary(b, spec)], peaks, spec) for b in benches]
    common.add_seed_ratios(rows)
    env["loadavg_end"] = common.loadavg()
    env["other_processes_cpu_cores"] = other.cores()
    by_round = {"gan_dist_fp32_vs_seed": round_ratios(rows[0], rows[1]),
                "gan_dist_defaults_vs_seed": round_ratios(rows[0], rows[2])}
    summary = (f"gan_dist fp32 / seed loop: {rows[1]['speedup_vs_seed']:.2f}x; "
               f"gan_dist defaults ({rows[2]['label']}) / seed loop: {rows[2]['speedup_vs_seed']:.2f}x "
               "(medians of the rows).\n" + describe_rounds(by_round))
    result = {"benchmark": "seed_loop", "env": env, "peak_flops_per_sec": peaks, "rows": rows, "skipped": [],
              "ratios": {"gan_dist_fp32_vs_seed": rows[1]["speedup_vs_seed"],
                         "gan_dist_defaults_vs_seed": rows[2]["speedup_vs_seed"]},
              "ratios_by_round": by_round, "summary": summary}
    print(common.write_outputs(result, args.json, args.md, None))
    teardown()
    return result


if __name__ == "__main__":
    main()
