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

    python benchmarks/stylegan2_reference.py --ref /path/to/stylegan2-ada-pytorch --check-outputs --threads 1

times nothing: it builds both sides' G and D at a few settings (CHECK_SETTINGS), copies gan_dist's
weights into the reference's by an explicit name map (`reference_name`), and prints the largest
differences of the mapping's w, the synthesis images, D's logits, R1's input gradient, path
length's J_w^T y and the parameter gradients of both penalties, in fp32 and in float64
(benchmarks/results/stylegan2_reference_outputs.json).

    python benchmarks/stylegan2_reference.py --ref /path/to/stylegan2-ada-pytorch --train-digits 400 --threads 1

trains configs/stylegan2_digits.yaml on both sides (gan_dist's trainer; the reference's phase
loop on the bundled digits with its G EMA) and prints the EMA generators' digits FD every
`--eval-every` steps (benchmarks/results/stylegan2_reference_digits.md): how the reference's own
recipe learns at this size, next to gan_dist's.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import subprocess
import sys
import math
import types
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from benchmarks.peers import alternate, gan_dist_step  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
R1_GAMMA, G_EVERY, D_EVERY, LR = 0.0064, 4, 16, 0.0025


def gan_dist_side(model: str, batch: int, overrides: list[str],
                  precision: str = "fp32") -> tuple[Callable[[int], None], dict[str, Any]]:
    cfg = common.build_config(model, batch, precision, "none", False, False,
                              [f"reg.r1_gamma={R1_GAMMA}", f"reg.d_every={D_EVERY}", f"train.lr_g={LR}",
                               f"train.lr_d={LR}", "train.beta1=0", "train.beta2=0.99", "ema.enabled=false",
                               *overrides])
    return gan_dist_step(cfg, batch)


def reference_side(ref: Path, cfg: Any, batch: int, next_real: Callable[[], torch.Tensor] | None = None,
                   seed: int = 0) -> tuple[Callable[[int], None], dict[str, Any]]:
    """The reference's training iteration (its phases and lazy intervals) as `step(i)`, on
    random images or on `next_real()`'s batches; the info holds its parameter counts and G."""
    sys.modules.setdefault("requests", types.ModuleType("requests"))  # imported by dnnlib, used to download
    sys.path.insert(0, str(ref))
    from training.loss import StyleGAN2Loss
    from training.networks import Discriminator, Generator

    from gan_dist.models.stylegan2 import sizes

    s, sg, R, C = sizes(cfg.model.stylegan2), cfg.model.stylegan2, cfg.model.resolution, cfg.model.channels
    torch.manual_seed(seed)
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
    gen = torch.Generator().manual_seed(seed)
    c = torch.zeros(batch, 0)

    def step(i: int) -> None:
        real = next_real() if next_real is not None else torch.rand(batch, C, R, R, generator=gen) * 2 - 1
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
    return step, {"params": counts, "G": G}


# ---- --check-outputs: the same weights and inputs through both networks ----------------------
# (name, config file or None, overrides, batch): the digits demo's widths at 32 px and the
# reference's paper256 sizes at 64 px, each unconditional and with a few classes; the batch equals
# the minibatch-std group, where the reference's strided groups and gan_dist's consecutive ones
# are the same group
CHECK_SETTINGS = [
    ("digits-32", "configs/stylegan2_digits.yaml", [], 4),
    ("digits-32-c4", "configs/stylegan2_digits.yaml", ["model.num_classes=4"], 4),
    ("paper256-64", None, ["model.arch=stylegan2", "model.resolution=64", "model.channels=3",
                           "model.stylegan2.preset=paper256"], 8),
    ("paper256-64-c3", None, ["model.arch=stylegan2", "model.resolution=64", "model.channels=3",
                              "model.stylegan2.preset=paper256", "model.num_classes=3"], 8),
]


def reference_name(ours: str) -> str:
    """The reference's name of one of gan_dist's StyleGAN2 tensors. The layers are the same, only
    named differently: `mapping.layers.i` is `mapping.fc{i}`, synthesis block k is `b{4*2^k}`, D's
    block k is `b{R/2^k}` and its epilogue `b4`."""
    parts = ours.split(".")
    if parts[0] == "G":
        parts = parts[1:]
        if parts[0] == "synthesis" and parts[1] == "blocks":
            parts = ["synthesis", f"b{4 * 2 ** int(parts[2])}", *parts[3:]]
    else:  # "D", resolution
        parts, res = parts[1:], int(parts[0][1:])
        if parts[0] == "blocks":
            parts = [f"b{res // 2 ** int(parts[1])}", *parts[2:]]
        elif parts[0] == "epilogue":
            parts = ["b4", *parts[1:]]
    if "layers" in parts:  # mapping.layers.i.weight -> mapping.fc{i}.weight
        i = parts.index("layers")
        parts = [*parts[:i], f"fc{parts[i + 1]}", *parts[i + 2:]]
    return ".".join(parts)


def copy_weights(ours: torch.nn.Module, theirs: torch.nn.Module, prefix: str) -> int:
    """Copy every tensor of `ours` (parameters and buffers) into its counterpart in `theirs`.

    Equalised learning rate is the same convention on both sides: weights are stored as drawn
    (N(0, 1/lr_mult^2) for FC layers, N(0, 1) for convolutions) and multiplied by lr_mult/sqrt(fan_in)
    in the forward pass, biases stored unscaled and multiplied by lr_mult; so every tensor copies
    as it is, except `noise_strength` ([1] here, a scalar there: FSDP2 shards no 0-dim tensor).
    Every tensor of theirs except the fixed FIR filters (`resample_filter`) must be written once."""
    mine = dict(ours.state_dict())
    dest = theirs.state_dict()
    written = set()
    for name, t in mine.items():
        rname = reference_name(f"{prefix}.{name}")
        if rname not in dest:
            raise SystemExit(f"--check-outputs: gan_dist's {prefix}.{name} maps to {rname!r}, which the reference lacks")
        if dest[rname].shape != t.reshape(dest[rname].shape).shape or dest[rname].numel() != t.numel():
            raise SystemExit(f"--check-outputs: {name} {tuple(t.shape)} vs the reference's {rname} "
                             f"{tuple(dest[rname].shape)}")
        with torch.no_grad():
            dest[rname].copy_(t.reshape(dest[rname].shape))
        written.add(rname)
    missing = [k for k in dest if k not in written and not k.endswith("resample_filter")]
    if missing:
        raise SystemExit(f"--check-outputs: the reference's {missing} have no counterpart in gan_dist's {prefix}")
    return len(written)


def _scramble(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Nonzero biases, noise strengths and w average (all zero at initialisation), so that every
    term of the forward pass is exercised; weights stay as initialised."""
    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if name.endswith("bias") or name.endswith("noise_strength"):
                t.add_(0.2 * torch.randn(t.shape, generator=gen))
            elif name.endswith("w_avg"):
                t.copy_(0.5 * torch.randn(t.shape, generator=gen))


def _diff(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Max abs difference, and relative to the reference's largest magnitude."""
    a, b = a.detach().double(), b.detach().double()
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    return {"max_abs": float(f"{err:.3e}"), "max_rel": float(f"{err / scale if scale else err:.3e}"),
            "ref_max": float(f"{scale:.4g}")}


def _outputs(G: torch.nn.Module, D: torch.nn.Module, inp: dict[str, torch.Tensor], c: Any, mode: str,
             dtype: torch.dtype) -> dict[str, Any]:
    """One side's outputs on the shared inputs (`c`: its own label form); in training mode also
    the tracked w average after one forward, R1's image gradient and path length's J_w^T y,
    with the parameter gradients of their squared norms (the double backwards Dreg and Greg
    train through)."""
    G.train(mode == "train"), D.train(mode == "train")
    z, ws, x, y = (inp[k].to(dtype) for k in ("z", "ws", "x", "y"))
    out: dict[str, Any] = {}
    w_avg = G.mapping.w_avg.clone()  # restored after each training-mode forward: every call sees the same
    with torch.no_grad():
        kw = {"update_w_avg": False} if hasattr(G.mapping, "sync_w_avg") else {"skip_w_avg_update": True}
        out["mapping w (psi 0.7)"] = G.mapping(z, c, truncation_psi=0.7, **kw)
        out["synthesis image (const noise)"] = G.synthesis(ws, noise_mode="const")
        out["G(z, c) image (psi 0.7, const noise, no mixing)"] = G(z, c, truncation_psi=0.7, noise_mode="const")
        G.mapping.w_avg.copy_(w_avg)
        out["D logits"] = D(x, c)
        if mode == "eval":
            return out
        G.mapping(z, c)
        out["w_avg after one training forward"] = G.mapping.w_avg.clone()
        G.mapping.w_avg.copy_(w_avg)
    D.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(True)
    g, = torch.autograd.grad(D(xi, c).sum(), xi, create_graph=True)
    g.square().sum().backward()
    out["R1 image gradient"] = g.detach()
    out["R1 |grad|^2 per sample"] = g.detach().square().sum(dim=(1, 2, 3))
    out["D grads"] = {n: p.grad.clone() for n, p in D.named_parameters() if p.grad is not None}
    G.zero_grad(set_to_none=True)
    w = ws.clone().requires_grad_(True)
    g, = torch.autograd.grad((G.synthesis(w, noise_mode="const") * y).sum(), w, create_graph=True)
    length = g.square().sum(dim=2).mean(dim=1).sqrt()
    length.sum().backward()
    out["path length J^T y"] = g.detach()
    out["path lengths"] = length.detach()
    out["G grads"] = {n: p.grad.clone() for n, p in G.named_parameters() if p.grad is not None}
    return out


class _Float64Torch(types.ModuleType):
    """torch, with float64 where code asks for float32: the reference's networks cast their
    activations to float32 (`x.to(torch.float32)`) wherever they do not run fp16; through this
    stand-in for their module's `torch` they run every step in float64 instead."""

    def __getattr__(self, key: str) -> Any:
        return torch.float64 if key == "float32" else getattr(torch, key)


@contextlib.contextmanager
def reference_in_float64(*nets: torch.nn.Module):
    """Float64 copies of the reference's networks (the fixed FIR filter buffers stay float32, as its
    resampling ops require; their taps k/64 are exact in both), run while the context is open."""
    import training.networks as ref_networks

    copies = []
    for net in nets:
        net = copy.deepcopy(net)
        for name, t in [*net.named_parameters(), *net.named_buffers()]:
            if not name.endswith("resample_filter"):
                t.data = t.data.double()
        copies.append(net)
    saved, ref_networks.torch = ref_networks.torch, _Float64Torch("torch")
    try:
        yield copies
    finally:
        ref_networks.torch = saved


def _grad_diffs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str, ref: bool) -> dict[str, Any]:
    """The worst parameter-gradient difference over a network, relative to each tensor's largest
    gradient; `b` in the reference's names when `ref`."""
    worst: dict[str, Any] = {"max_abs": 0.0, "max_rel": 0.0, "tensor": None}
    for name, ga in a.items():
        gb = b[reference_name(f"{prefix}.{name}") if ref else name]
        d = _diff(ga.reshape(gb.shape), gb)
        if d["max_rel"] >= worst["max_rel"]:
            worst = {"max_abs": d["max_abs"], "max_rel": d["max_rel"], "tensor": name}
    return worst


def check_setting(ref: Path, name: str, path: str | None, overrides: list[str], batch: int) -> dict[str, Any]:
    """Build both sides' G and D at one setting, copy gan_dist's weights into the reference's, and
    compare their outputs (and R1 and path-length gradients) on the same inputs in fp32. Beside
    each difference: gan_dist's own fp32 result against its float64 result (the same weights and
    inputs), the size of fp32 rounding for that quantity: where the two sides differ by rounding
    only, the reference's fp32 result is as far from the float64 one as gan_dist's."""
    from gan_dist.config import load_config
    from gan_dist.models.stylegan2 import sizes, spec

    sys.modules.setdefault("requests", types.ModuleType("requests"))
    if str(ref) not in sys.path:
        sys.path.insert(0, str(ref))
    from training.networks import Discriminator as RefD, Generator as RefG

    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / path if path else None, [*overrides, f"train.batch_size={batch}"])
    m, sg = cfg.model, cfg.model.stylegan2
    s, K, R, C = sizes(sg), m.num_classes, m.resolution, m.channels
    if s["mbstd_group"] != batch:
        raise SystemExit(f"{name}: batch {batch} must equal the minibatch-std group {s['mbstd_group']}")
    sp = spec(m)
    torch.manual_seed(0)
    G, D = sp.make_generator(), sp.make_discriminator()
    sp.init(G), sp.init(D)
    gen = torch.Generator().manual_seed(1)
    _scramble(G, gen), _scramble(D, gen)
    rG = RefG(z_dim=sg.z_dim, c_dim=K, w_dim=sg.w_dim, img_resolution=R, img_channels=C,
              mapping_kwargs=dict(num_layers=s["mapping_layers"], w_avg_beta=sg.w_avg_beta),
              synthesis_kwargs=dict(channel_base=s["channel_base"], channel_max=s["channel_max"],
                                    conv_clamp=s["conv_clamp"]))
    rD = RefD(c_dim=K, img_resolution=R, img_channels=C, channel_base=s["channel_base"],
              channel_max=s["channel_max"], conv_clamp=s["conv_clamp"],
              epilogue_kwargs=dict(mbstd_group_size=s["mbstd_group"]))
    n_g, n_d = copy_weights(G, rG, "G"), copy_weights(D, rD, f"D{R}")
    G64, D64 = copy.deepcopy(G).double(), copy.deepcopy(D).double()
    z = torch.randn(batch, sg.z_dim, generator=gen)
    c = torch.arange(batch) % K if K else None
    rc = torch.nn.functional.one_hot(c, K).float() if K else torch.zeros(batch, 0)
    with torch.no_grad():  # shared inputs: w from the reference's mapping, half real-like and half G's images
        rG.eval()
        ws = rG.mapping(z, rc, truncation_psi=0.7, skip_w_avg_update=True)
        img = rG.synthesis(ws, noise_mode="const")
    x = torch.cat([img[: batch // 2], torch.rand(batch - batch // 2, C, R, R, generator=gen) * 2 - 1])
    inp = {"z": z, "ws": ws, "x": x, "y": torch.randn(batch, C, R, R, generator=gen) / math.sqrt(R * R)}
    out: dict[str, Any] = {"setting": name, "overrides": overrides, "batch": batch, "resolution": R,
                           "num_classes": K, "tensors_copied": {"G": n_g, "D": n_d}}
    # the forward outputs in both modes (in eval mode the reference fuses the modulation into the
    # weights), the gradients in training mode (what the phases differentiate)
    for mode in ("eval", "train"):
        ours = _outputs(G, D, inp, c, mode, torch.float32)
        theirs = _outputs(rG, rD, inp, rc, mode, torch.float32)
        ours64 = _outputs(G64, D64, inp, c, mode, torch.float64)
        with reference_in_float64(rG, rD) as (rG64, rD64):
            theirs64 = _outputs(rG64, rD64, inp, rc.double(), mode, torch.float64)
        res: dict[str, Any] = {}
        for k, v in ours.items():
            if k.endswith("grads"):
                net = k[0]
                prefix = "G" if net == "G" else f"D{R}"
                d = _grad_diffs(v, theirs[k], prefix, True)
                d["fp64"] = _grad_diffs(ours64[k], theirs64[k], prefix, True)["max_rel"]
                d["ref_fp32_vs_fp64"] = _grad_diffs(theirs64[k], theirs[k], prefix, False)["max_rel"]
                d["ours_fp32_vs_fp64"] = _grad_diffs(v, ours64[k], prefix, False)["max_rel"]
                label = ("R1 penalty's D" if net == "D" else "path lengths' G") + " parameter gradients (worst tensor)"
            else:
                d = _diff(v, theirs[k])
                d["fp64"] = _diff(ours64[k], theirs64[k])["max_rel"]
                d["ref_fp32_vs_fp64"] = _diff(theirs[k], theirs64[k])["max_rel"]
                d["ours_fp32_vs_fp64"] = _diff(v, ours64[k])["max_rel"]
                label = k
            res[label] = d
        out[mode] = res
    return out


def check_outputs(args: argparse.Namespace, ref: Path, revision: str) -> None:
    """--check-outputs: print and write the differences of every setting."""
    torch.backends.cudnn.allow_tf32 = False
    results = [check_setting(ref, *setting) for setting in CHECK_SETTINGS
               if not args.settings or setting[0] in args.settings]
    worst = max(d["max_rel"] for r in results for mode in ("eval", "train") for d in r[mode].values())
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
              "reference": {"repo": "NVlabs/stylegan2-ada-pytorch", "revision": revision},
              "precision": "fp32", "threads": args.threads, "torch": torch.__version__,
              "worst_max_rel": worst, "settings": results}
    out = Path(args.out) if args.out else RESULTS / "stylegan2_reference_outputs.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    lines = []
    for r in results:
        lines.append(f"{r['setting']} ({r['resolution']} px, {r['num_classes']} classes, batch {r['batch']}; "
                     f"tensors copied G {r['tensors_copied']['G']}, D {r['tensors_copied']['D']})")
        for mode in ("eval", "train"):
            for k, d in r[mode].items():
                where = f"  [{d['tensor']}]" if d.get("tensor") else ""
                lines.append(f"  {mode:5s} {k:52s} max abs {d['max_abs']:.2e}  max rel {d['max_rel']:.2e}  "
                             f"| fp64 max rel {d['fp64']:.2e} | fp32 vs fp64: ref {d['ref_fp32_vs_fp64']:.2e}, "
                             f"ours {d['ours_fp32_vs_fp64']:.2e}{where}")
    lines.append(f"worst relative difference: {worst:.2e}")
    print("\n".join(lines))


# ---- --train-digits: both sides train the digits demo; the EMA generators' digits FD -------------
DIGITS_CONFIG = "configs/stylegan2_digits.yaml"


def _reference_digits_curve(ref: Path, steps: int, every: int, seed: int,
                            overrides: list[str]) -> dict[int, dict[str, float]]:
    """The reference trained on the bundled digits with the demo config's sizes and recipe (its
    phases, lazy intervals, batch, G EMA with ramp-up as its training loop keeps it); its EMA
    generator's digits FD (gan_dist's metric, 2000 samples against all digits) every `every` steps."""
    from gan_dist.config import load_config
    from gan_dist.data.demo import demo_images
    from gan_dist.metrics.digits import class_coverage, digits_fd, digits_stats, load_digits_extractor

    cfg = load_config(REPO / DIGITS_CONFIG, [*overrides, f"run.seed={seed}"])
    batch, z_dim = cfg.train.batch_size, cfg.model.stylegan2.z_dim
    u8, _ = demo_images()
    data = torch.from_numpy(u8).float().unsqueeze(1) / 127.5 - 1  # as the shards decode
    gen = torch.Generator().manual_seed(seed)
    step, info = reference_side(ref, cfg, batch, lambda: data[torch.randint(len(data), (batch,), generator=gen)], seed)
    G = info["G"]
    G_ema = copy.deepcopy(G).eval()
    extractor = load_digits_extractor()
    real_stats = digits_stats(data, extractor)
    curve = {}

    def evaluate(i: int) -> None:
        zg = torch.Generator().manual_seed(12345)
        with torch.no_grad():
            imgs = torch.cat([G_ema(torch.randn(250, z_dim, generator=zg), torch.zeros(250, 0)).clamp(-1, 1)
                              for _ in range(cfg.eval.num_samples // 250)])
        curve[i] = {"digits_fd": round(digits_fd(imgs, real_stats, extractor), 2),
                    "class_coverage": int(class_coverage(imgs, extractor=extractor).covered)}
        print(json.dumps({"side": "reference", "seed": seed, "step": i, **curve[i]}), flush=True)

    evaluate(0)
    for i in range(steps):
        step(i)
        nimg = (i + 1) * batch  # training_loop.py's G EMA: half-life ema_kimg, ramped up
        ema_nimg = cfg.ema.half_life_kimg * 1000
        if cfg.ema.rampup is not None:
            ema_nimg = min(ema_nimg, nimg * cfg.ema.rampup)
        beta = 0.5 ** (batch / max(ema_nimg, 1e-8))
        with torch.no_grad():
            for p_ema, p in zip(G_ema.parameters(), G.parameters()):
                p_ema.copy_(p.lerp(p_ema, beta))
            for b_ema, b in zip(G_ema.buffers(), G.buffers()):
                b_ema.copy_(b)
        if (i + 1) % every == 0:
            evaluate(i + 1)
    return curve


def _gan_dist_digits_curve(steps: int, every: int, seed: int, threads: int,
                           overrides: list[str]) -> dict[int, dict[str, float]]:
    """gan_dist's trainer on the demo config (its own evaluation: the EMA generator's digits FD)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "gan_dist.train", "--config", DIGITS_CONFIG, f"train.steps={steps}",
                        f"eval.every={every}", "train.sample_every=100000", "train.ckpt_every=100000", *overrides,
                        f"run.seed={seed}", f"run.threads={threads}", f"run.dir={tmp}/run"],
                       cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    curve = {r["step"]: {"digits_fd": round(r["digits_fd"], 2), "class_coverage": r["class_coverage"]} for r in rows}
    print(json.dumps({"side": "gan_dist", "seed": seed, "curve": curve}), flush=True)
    return curve


def train_digits(args: argparse.Namespace, ref: Path, revision: str) -> None:
    result: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "reference": {"repo": "NVlabs/stylegan2-ada-pytorch", "revision": revision},
        "config": DIGITS_CONFIG, "overrides": args.overrides, "steps": args.train_digits, "eval_every": args.eval_every, "threads": args.threads,
        "metric": "digits FD of the EMA generator, 2000 samples against all 1797 digits", "seeds": {},
    }
    for seed in args.seeds:
        result["seeds"][seed] = {
            "gan_dist": _gan_dist_digits_curve(args.train_digits, args.eval_every, seed, args.threads, args.overrides),
            "reference": _reference_digits_curve(ref, args.train_digits, args.eval_every, seed, args.overrides)}
    out = Path(args.out) if args.out else RESULTS / "stylegan2_reference_digits.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# StyleGAN2 on the bundled digits: gan_dist and stylegan2-ada-pytorch {revision[:7]} trained alike",
             "", f"`{result['command']}`", "",
             f"Both train {DIGITS_CONFIG}'s sizes and recipe (overrides: {args.overrides or 'none'}) for {args.train_digits} steps (batch 32, "
             "fp32 on the reference's side, the config's bf16 on gan_dist's); "
             f"{result['metric']}. The seeds set each side's own initialisation and draws: the two "
             "curves of a seed are two runs, not one run twice.", "",
             "| seed | side | " + " | ".join(str(k) for k in range(0, args.train_digits + 1, args.eval_every)) + " |",
             "|---|---|" + "---:|" * (args.train_digits // args.eval_every + 1)]
    for seed, sides in result["seeds"].items():
        for side, curve in sides.items():
            lines.append(f"| {seed} | {side} | " + " | ".join(f"{curve[k]['digits_fd']:.1f}" for k in sorted(curve)) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


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
    p.add_argument("--check-outputs", action="store_true",
                   help="instead of timing: copy gan_dist's weights into the reference's G and D at a few "
                        "settings and print the differences of their outputs on the same inputs (fp32)")
    p.add_argument("--settings", nargs="*", default=None, metavar="NAME",
                   help=f"with --check-outputs, only these of: {', '.join(s[0] for s in CHECK_SETTINGS)}")
    p.add_argument("--train-digits", type=int, default=0, metavar="STEPS",
                   help=f"instead of timing: train {DIGITS_CONFIG} for STEPS steps on both sides and print the "
                        "EMA generators' digits FD curves (benchmarks/results/stylegan2_reference_digits.md)")
    p.add_argument("--eval-every", type=int, default=50, help="with --train-digits: steps between evaluations")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="with --train-digits")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ref = Path(args.ref).resolve()
    revision = args.revision or subprocess.run(["git", "-C", str(ref), "rev-parse", "HEAD"], capture_output=True,
                                               text=True).stdout.strip()
    if args.check_outputs:
        check_outputs(args, ref, revision)
        return
    if args.train_digits:
        train_digits(args, ref, revision)
        return

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
    rows = alternate(sides, args.batch_size, args.iters, args.repeats)
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
