"""gan_dist's R3GAN iteration side by side with brownvc/R3GAN's own, in one process.

    python benchmarks/r3gan_reference.py --ref /path/to/R3GAN --model r3gan-cifar10 --batch-size 4 \
        --iters 2 --repeats 3 --threads 1

Both sides train the same architecture (the preset's widths, cardinalities and blocks) and batch
with the reference's recipe at its schedules' start: a D phase with the relativistic loss plus
R1 and R2 on every step (gamma / 2 each), then a G phase with the relativistic loss, Adam (0, 0.9),
one process; fp32 on both sides (`--precision fp32`), or each side's own mixed precision
(`--precision preset`: the reference's bf16 stages of the preset, gan_dist's bf16 autocast), or
both with the preset's bf16 stages (`--precision stages`: gan_dist's train.precision=fp32 with
model.r3gan.bf16_stages=preset). The reference runs its `training/loss.py` R3GANLoss and the phase loop of
`training/training_loop.py` (rewritten here: its loop also loads data, all-reduces and writes
snapshots) on its CPU paths (`bias_act` and `upfirdn2d` reference implementations); gan_dist
runs `gan_dist.loop.train_step` with its defaults for a CPU (channels_last, matmul
convolutions on small grids). No augmentation and no G EMA on either side. Blocks of `--iters`
iterations alternate between the two (`--repeats` each, after one warm-up block), so both see
the same machine load. The reference checkout is imported from `--ref` only (it is not a
package); its `pkg_resources` import (only `parse_version`) is answered by `packaging` and its
`requests` import is stubbed: nothing is downloaded in this path. Results go to benchmarks/results/.

    python benchmarks/r3gan_reference.py --ref /path/to/R3GAN --check-outputs --threads 1

does not time: it copies gan_dist's G and D weights into the reference's (an explicit name map that
pairs every parameter once) at the digits demo's widths and the cifar10 preset's, unconditional and
with 10 classes, and compares G's images, D's logits, R1's input gradient and the parameter gradients
of the R1 penalty and of G's loss, in fp32 and in fp64, and with 3 bf16 stages on both sides
(gan_dist's model.r3gan.bf16_stages=3, the reference's FP16Stages [-1, -2, -3] for G and D's
first three); and each layer's init std of both sides (r3gan_reference_outputs.{json,md}).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import types
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from benchmarks.peers import alternate, gan_dist_step  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# the reference's CIFAR10 / FFHQ-64 presets at the start of their schedules (train.py), with the
# G stages it runs in bf16 (`FP16Stages`; D's are the same resolutions)
RECIPES = {"r3gan-cifar10": {"gamma": 0.05, "lr": 2e-4, "beta2": 0.9, "bf16_stages": [-1, -2, -3]},
           "r3gan-ffhq64": {"gamma": 2.0, "lr": 2e-4, "beta2": 0.9, "bf16_stages": [-1, -2, -3, -4]}}


def gan_dist_side(model: str, batch: int, precision: str,
                  overrides: list[str]) -> tuple[Callable[[int], None], dict[str, Any]]:
    r = RECIPES[model]
    stages = ["model.r3gan.bf16_stages=preset"] if precision == "stages" else []
    cfg = common.build_config(model, batch, "bf16" if precision == "preset" else "fp32", "none", True, False,
                              [*stages, f"reg.r1_gamma={r['gamma']}", f"reg.r2_gamma={r['gamma']}", "reg.d_every=1",
                               f"train.lr_g={r['lr']}", f"train.lr_d={r['lr']}", "train.beta1=0",
                               f"train.beta2={r['beta2']}", "ema.enabled=false", *overrides])
    return gan_dist_step(cfg, batch)


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
    g_bf16 = r["bf16_stages"] if precision in ("preset", "stages") else []
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


# ---- --check-outputs: the same weights, the same outputs -----------------------------------------
# The settings the equality mode covers: the digits demo's widths (configs/r3gan_digits.yaml, RGB: the
# reference's networks have 3 channels) and the cifar10 preset's, each unconditional and with 10 classes.
CHECK_SETTINGS = {
    "digits": ["model.resolution=32", "model.r3gan.preset=tiny", "model.r3gan.widths=[32,32,16,8]",
               "model.r3gan.cardinalities=[1,1,1,1]", "model.r3gan.blocks=[1,1,1,0]", "model.r3gan.expansion=2",
               "model.r3gan.z_dim=32"],
    "cifar10": ["model.resolution=32", "model.r3gan.preset=cifar10"],
}
# the bf16 stages compared: cifar10's FP16Stages count (G's last 3, D's first 3), at both settings' 4 stages
CHECK_BF16_STAGES = 3
# gan_dist's parameter names -> the reference's (training/networks.py wrappers, R3GAN/Networks.py inside).
# Stages and layer indices are the same on both sides (G: transition first, D: transition last). Neither side
# scales its weights at run time (the reference's Convolution casts the dtype only, its bias_act runs with
# gain=1), so every weight is copied unscaled: the factor of each rule is 1, kept explicit for the check.
NAME_MAP: dict[str, list[tuple[str, str, float]]] = {
    "G": [(r"stages\.(\d+)\.layers\.0\.basis", r"Model.MainLayers.\1.Layers.0.Basis", 1.0),
          (r"stages\.(\d+)\.layers\.0\.linear\.weight", r"Model.MainLayers.\1.Layers.0.LinearLayer.weight", 1.0),
          (r"to_image\.weight", "Model.AggregationLayer.Layer.weight", 1.0),
          (r"embed\.weight", "Model.EmbeddingLayer.weight", 1.0)],
    "D": [(r"from_image\.weight", "Model.ExtractionLayer.Layer.weight", 1.0),
          (r"stages\.(\d+)\.layers\.(\d+)\.basis\.weight", r"Model.MainLayers.\1.Layers.\2.Basis.weight", 1.0),
          (r"stages\.(\d+)\.layers\.(\d+)\.linear\.weight", r"Model.MainLayers.\1.Layers.\2.LinearLayer.weight", 1.0),
          (r"embed\.weight", "Model.EmbeddingLayer.weight", 1.0)],
    "both": [(r"stages\.(\d+)\.layers\.(\d+)\.expand\.weight", r"Model.MainLayers.\1.Layers.\2.LinearLayer1.Layer.weight", 1.0),
             (r"stages\.(\d+)\.layers\.(\d+)\.grouped\.weight", r"Model.MainLayers.\1.Layers.\2.LinearLayer2.Layer.weight", 1.0),
             (r"stages\.(\d+)\.layers\.(\d+)\.project\.weight", r"Model.MainLayers.\1.Layers.\2.LinearLayer3.Layer.weight", 1.0),
             (r"stages\.(\d+)\.layers\.(\d+)\.act1\.bias", r"Model.MainLayers.\1.Layers.\2.NonLinearity1.Bias", 1.0),
             (r"stages\.(\d+)\.layers\.(\d+)\.act2\.bias", r"Model.MainLayers.\1.Layers.\2.NonLinearity2.Bias", 1.0),
             (r"stages\.(\d+)\.layers\.(\d+)\.proj\.weight", r"Model.MainLayers.\1.Layers.\2.LinearLayer.Layer.weight", 1.0)],
}


def reference_name(net: str, name: str) -> tuple[str, float]:
    """The reference's name for one of gan_dist's parameters, and the factor its value is multiplied by."""
    import re

    for pattern, repl, factor in NAME_MAP[net] + NAME_MAP["both"]:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, repl, name), factor
    raise KeyError(f"no rule maps gan_dist's {net} parameter {name!r} to the reference's")


def name_pairs(net: str, ours: torch.nn.Module, theirs: torch.nn.Module) -> list[tuple[str, str, float]]:
    """Every parameter of both sides paired exactly once, with equal shapes (or an error naming the gap)."""
    theirs_params = dict(theirs.named_parameters())
    pairs = []
    for name, q in ours.named_parameters():
        ref, factor = reference_name(net, name)
        if ref not in theirs_params or theirs_params[ref].shape != q.shape:
            raise SystemExit(f"{net}: {name} {tuple(q.shape)} -> {ref}: "
                             f"{tuple(theirs_params[ref].shape) if ref in theirs_params else 'missing'}")
        pairs.append((name, ref, factor))
    unmapped = set(theirs_params) - {r for _, r, _ in pairs}
    if unmapped or len(pairs) != len(theirs_params):
        raise SystemExit(f"{net}: reference parameters no gan_dist parameter maps to: {sorted(unmapped)}")
    return pairs


def build_pair(setting: str, classes: int, seed: int) -> dict[str, Any]:
    """gan_dist's G and D (its spec, its init at `seed`) and the reference's at the same sizes (its own init)."""
    from training.networks import Discriminator, Generator

    from gan_dist.config import load_config
    from gan_dist.models import model_spec
    from gan_dist.models.r3gan import resolve

    cfg = load_config(None, ["model.arch=r3gan", "model.channels=3", f"model.num_classes={classes}",
                             *CHECK_SETTINGS[setting]])
    spec = model_spec(cfg.model)
    G, D = spec.build(seed)
    p, R = resolve(cfg.model.r3gan), cfg.model.resolution
    embed = {"ConditionEmbeddingDimension": p.z_dim} if classes else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        G_ref = Generator(NoiseDimension=p.z_dim, WidthPerStage=list(p.widths), CardinalityPerStage=list(p.cardinalities),
                          BlocksPerStage=list(p.blocks), ExpansionFactor=p.expansion, KernelSize=cfg.model.r3gan.kernel_size,
                          FP16Stages=[], c_dim=classes, img_resolution=R, **embed)
        embed = {"ConditionEmbeddingDimension": p.widths[0]} if classes else {}  # train.py: G's first width
        D_ref = Discriminator(WidthPerStage=list(p.widths)[::-1], CardinalityPerStage=list(p.cardinalities)[::-1],
                              BlocksPerStage=list(p.blocks)[::-1], ExpansionFactor=p.expansion,
                              KernelSize=cfg.model.r3gan.kernel_size, FP16Stages=[], c_dim=classes, img_resolution=R,
                              **embed)
    return {"G": G, "D": D, "G_ref": G_ref, "D_ref": D_ref, "preset": p, "resolution": R}


def randomise_zeros_(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Draw the parameters the init sets to zero (each block's last layer, the activation biases), so that
    every block and bias takes part in the comparison: N(0, 1/fan_in) weights, N(0, 0.2^2) biases."""
    with torch.no_grad():
        for q in module.parameters():
            if q.count_nonzero() == 0:
                std = 0.2 if q.dim() == 1 else 1.0 / q[0].numel() ** 0.5
                q.copy_(torch.randn(q.shape, generator=gen) * std)


def copy_weights_(pairs: list[tuple[str, str, float]], ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    src, dst = dict(ours.named_parameters()), dict(theirs.named_parameters())
    with torch.no_grad():
        for name, ref, factor in pairs:
            dst[ref].copy_(src[name] * factor)


def difference(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """max |a - b|, and relative to max |b| (the reference's scale)."""
    err = (a.detach().double() - b.detach().double()).abs().max().item()
    scale = b.detach().double().abs().max().item()
    return {"max_abs": float(f"{err:.3e}"), "max_rel": float(f"{err / max(scale, 1e-30):.3e}"),
            "scale": float(f"{scale:.4g}")}


def r1_grads(D: torch.nn.Module, x: torch.Tensor, c: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """d D(x).sum() / dx, and the parameter gradient of the R1 penalty sum_n |dD/dx_n|^2 (the double backward)."""
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(D(x, c).sum(), x, create_graph=True)
    params = list(D.parameters())
    pg = torch.autograd.grad(g.square().sum(), params, allow_unused=True)
    return g, [torch.zeros_like(q) if t is None else t for q, t in zip(params, pg)]


def side_quantities(G: torch.nn.Module, D: torch.nn.Module, z: torch.Tensor, c: Any, real: torch.Tensor,
                    order: list[str], g_order: list[str]) -> dict[str, torch.Tensor]:
    """One side's outputs on the given inputs: G's images, D's logits, the R1 gradients, G's gradient via D;
    parameter gradients flattened in `order` / `g_order` (parameter names of that side)."""
    with torch.no_grad():
        img = G(z, c)
        out = {"G image": img, "D logit (G's images)": D(img, c)}
        signs: list[torch.Tensor] = []
        hooks = [m.register_forward_hook(lambda m, i, o: signs.append(o > 0)) for m in activations(D)]
        out["D logit (random images)"] = D(real, c)
        for h in hooks:
            h.remove()
        out["D branches (random images)"] = torch.cat([t.flatten() for t in signs])
    g, pg = r1_grads(D, real, c)
    named = dict(zip([n for n, _ in D.named_parameters()], pg))
    out["R1 dD/dx"], out["R1 penalty dparams"] = g, torch.cat([named[n].flatten() for n in order])
    gp = dict(zip([n for n, _ in G.named_parameters()], torch.autograd.grad(D(G(z, c), c).mean(), list(G.parameters()))))
    out["G dparams through D"] = torch.cat([gp[n].flatten() for n in g_order])
    return out


def bf16_stage_nets(setting: str, classes: int, G: torch.nn.Module, D: torch.nn.Module,
                    n: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """gan_dist's G and D built with model.r3gan.bf16_stages=n (train.precision=fp32), holding G's and D's weights."""
    from gan_dist.config import load_config
    from gan_dist.models import model_spec

    cfg = load_config(None, ["model.arch=r3gan", "model.channels=3", f"model.num_classes={classes}",
                             "train.precision=fp32", f"model.r3gan.bf16_stages={n}", *CHECK_SETTINGS[setting]])
    G_b, D_b = model_spec(cfg.model).build(0)
    G_b.load_state_dict(G.state_dict())
    D_b.load_state_dict(D.state_dict())
    return G_b.train().requires_grad_(True), D_b.train().requires_grad_(True)


def set_reference_bf16_(G_ref: torch.nn.Module, D_ref: torch.nn.Module, n: int, dtype: torch.dtype) -> None:
    """The reference's FP16Stages as its training/networks.py sets them: G's stages -1..-n, D's (train.py's
    mapping) -1 + n .. -n + n, i.e. its first n, get `dtype` as their DataType."""
    g_stages = [-(i + 1) for i in range(n)]
    for x in g_stages:
        G_ref.Model.MainLayers[x].DataType = dtype
    for x in [i + n for i in g_stages]:
        D_ref.Model.MainLayers[x].DataType = dtype


def activations(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The biased leaky ReLUs, in forward order: gan_dist's BiasedLeakyReLU, the reference's NonLinearity1/2."""
    return [m for n, m in module.named_modules()
            if type(m).__name__ == "BiasedLeakyReLU" or n.rsplit(".", 1)[-1].startswith("NonLinearity")]


def to_float64_(module: torch.nn.Module, reference: bool) -> None:
    """The network in float64 (the reference: its parameters and its stages' DataType; its FIR kernels stay
    float32, which its upfirdn2d asserts, and are cast to the input's dtype there)."""
    if not reference:
        module.double()
        return
    for q in module.parameters():
        q.data = q.data.double()
    for stage in module.Model.MainLayers:
        stage.DataType = torch.float64


def compare_outputs(setting: str, classes: int, batch: int, seed: int) -> dict[str, Any]:
    """Both sides with the same weights on the same inputs, in fp32 and in fp64. fp32 gan_dist vs fp32 reference
    is the check; fp64 vs fp64 shows whether any difference is arithmetic (it must vanish to ~1e-15) or rounding;
    the reference's fp32 against its own fp64 is the size of fp32 rounding at these weights."""
    nets = build_pair(setting, classes, seed)
    G, D, G_ref, D_ref, p, R = (nets[k] for k in ("G", "D", "G_ref", "D_ref", "preset", "resolution"))
    gen = torch.Generator().manual_seed(seed + 1)
    randomise_zeros_(G, gen)
    randomise_zeros_(D, gen)
    pairs = {"G": name_pairs("G", G, G_ref), "D": name_pairs("D", D, D_ref)}
    if any(f != 1.0 for net in pairs.values() for _, _, f in net):
        raise SystemExit("a rescaled weight: its parameter gradients would need the inverse factor")
    copy_weights_(pairs["G"], G, G_ref)
    copy_weights_(pairs["D"], D, D_ref)
    for m in (G, D, G_ref, D_ref):
        m.train().requires_grad_(True)
    z = torch.randn(batch, p.z_dim, generator=gen)
    labels = torch.randint(0, classes, (batch,), generator=gen) if classes else None
    c_ref = (torch.nn.functional.one_hot(labels, classes).float() if classes else torch.zeros(batch, 0))
    real = torch.rand(batch, 3, R, R, generator=gen) * 2 - 1
    orders = {k: ([n for n, _, _ in pairs[k]], [r for _, r, _ in pairs[k]]) for k in pairs}
    results = {}
    for dtype in (torch.float32, "bf16 stages", torch.float64):
        if dtype == "bf16 stages":  # between fp32 and fp64: the weights are still the fp32 ones
            G_b, D_b = bf16_stage_nets(setting, classes, G, D, CHECK_BF16_STAGES)
            set_reference_bf16_(G_ref, D_ref, CHECK_BF16_STAGES, torch.bfloat16)
            results[("gan_dist", dtype)] = side_quantities(G_b, D_b, z, labels, real, orders["D"][0], orders["G"][0])
            results[("reference", dtype)] = side_quantities(G_ref, D_ref, z, c_ref, real, orders["D"][1], orders["G"][1])
            set_reference_bf16_(G_ref, D_ref, CHECK_BF16_STAGES, torch.float32)
            continue
        if dtype == torch.float64:
            for m, is_ref in ((G, False), (D, False), (G_ref, True), (D_ref, True)):
                to_float64_(m, is_ref)
        zz, rr, cr = z.to(dtype), real.to(dtype), c_ref.to(dtype)
        results[("gan_dist", dtype)] = side_quantities(G, D, zz, labels, rr, orders["D"][0], orders["G"][0])
        results[("reference", dtype)] = side_quantities(G_ref, D_ref, zz, cr, rr, orders["D"][1], orders["G"][1])
    out: dict[str, Any] = {"setting": setting, "classes": classes, "batch": batch,
                           "params": {"G": sum(q.numel() for q in G.parameters()),
                                      "D": sum(q.numel() for q in D.parameters())}}
    # a leaky ReLU input within rounding of zero takes the other slope (1 or 0.2) in fp32 than in fp64: the
    # forward stays continuous, the input gradient (R1) jumps. Count those branch flips per side.
    branches = "D branches (random images)"
    out["branch flips fp32 vs fp64 (D, random images)"] = {
        side: int((results[(side, torch.float32)][branches] != results[(side, torch.float64)][branches]).sum())
        for side in ("gan_dist", "reference")}
    out["activations (D, random images)"] = results[("gan_dist", torch.float32)][branches].numel()
    for key in results[("gan_dist", torch.float32)]:
        if key == branches:
            continue
        out[key] = {"fp32": difference(results[("gan_dist", torch.float32)][key], results[("reference", torch.float32)][key]),
                    "fp64": difference(results[("gan_dist", torch.float64)][key], results[("reference", torch.float64)][key]),
                    "reference fp32 vs fp64": difference(results[("reference", torch.float32)][key],
                                                         results[("reference", torch.float64)][key]),
                    "gan_dist fp32 vs reference fp64": difference(results[("gan_dist", torch.float32)][key],
                                                                  results[("reference", torch.float64)][key]),
                    "bf16 stages": difference(results[("gan_dist", "bf16 stages")][key],
                                              results[("reference", "bf16 stages")][key]),
                    "reference bf16 stages vs fp32": difference(results[("reference", "bf16 stages")][key],
                                                                results[("reference", torch.float32)][key]),
                    "gan_dist bf16 stages vs fp32": difference(results[("gan_dist", "bf16 stages")][key],
                                                               results[("gan_dist", torch.float32)][key])}
    return out


def init_statistics(setting: str, classes: int, draws: int) -> dict[str, Any]:
    """Per layer: the weight's std pooled over `draws` initialisations of each side (seeds 0..draws-1),
    gan_dist's against the reference's (which scales each layer by its fix-up rule). Each side's std of n pooled
    values has a relative sampling error of about 1/sqrt(2 n), their ratio 1/sqrt(n); `tolerance` is 5/sqrt(2 n),
    about 3.5 sampling errors of the ratio."""
    sums: dict[str, list[float]] = {}
    counts: dict[str, int] = {}
    fan_in: dict[str, int] = {}
    names = None
    for seed in range(draws):
        nets = build_pair(setting, classes, seed)
        for net in ("G", "D"):
            ours, theirs = nets[net], nets[net + "_ref"]
            pairs = name_pairs(net, ours, theirs)
            src, dst = dict(ours.named_parameters()), dict(theirs.named_parameters())
            for name, ref, factor in pairs:
                key = f"{net}.{name}"
                s = sums.setdefault(key, [0.0, 0.0])
                s[0] += src[name].double().square().sum().item()
                s[1] += (dst[ref].double() / factor).square().sum().item()
                counts[key] = counts.get(key, 0) + src[name].numel()
                fan_in[key] = src[name][0].numel() if src[name].dim() > 1 else 1
        names = names or list(sums)
    layers, worst = [], 0.0
    for key in names:
        n = counts[key]
        ours, theirs = (sums[key][0] / n) ** 0.5, (sums[key][1] / n) ** 0.5
        ratio = ours / theirs if theirs else (1.0 if ours == 0 else float("inf"))
        tol = 5 / (2 * n) ** 0.5
        layers.append({"layer": key, "n": n, "std_gan_dist": float(f"{ours:.5g}"), "std_reference": float(f"{theirs:.5g}"),
                       "gain_gan_dist": round(ours * fan_in[key] ** 0.5, 4),
                       "gain_reference": round(theirs * fan_in[key] ** 0.5, 4), "ratio": round(ratio, 4), "tolerance": round(tol, 4), "ok": abs(ratio - 1) <= tol})
        worst = max(worst, abs(ratio - 1) / tol if theirs else (0.0 if ours == 0 else float("inf")))
    return {"setting": setting, "classes": classes, "draws": draws, "layers": layers,
            "all_within_tolerance": all(r["ok"] for r in layers), "worst_deviation_over_tolerance": round(worst, 3)}


def write_check_markdown(result: dict[str, Any], path: Path) -> None:
    first = result["outputs"][0]
    keys = [k for k in first if isinstance(first[k], dict) and "fp32" in first[k]]
    lines = [f"# R3GAN: gan_dist's networks against the reference's ({result['reference']['repo']} "
             f"{result['reference']['revision'][:7]}), same weights, same inputs", "",
             f"`{result['command']}`", "",
             "gan_dist's G and D (its own init, then every zero-initialised weight and bias drawn at random so "
             "every block takes part) copied into the reference's `training/networks.py` G and D by an explicit "
             "name map (every parameter of both sides paired once; no weight is rescaled: neither side scales "
             "weights at run time), on its CPU paths (`bias_act` and `upfirdn2d` reference implementations). Relative = max |difference| / max |reference|.", "",
             "| setting | classes | batch | params G | params D | quantity | fp32: gan_dist vs reference | "
             "fp64: gan_dist vs reference | fp32 rounding: reference fp32 vs its fp64 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["outputs"]:
        for i, k in enumerate(keys):
            head = (f"| {r['setting']} | {r['classes']} | {r['batch']} | {r['params']['G']:,} | {r['params']['D']:,} "
                    if i == 0 else "| | | | | ")
            lines.append(head + f"| {k} | " + " | ".join(
                f"{r[k][m]['max_abs']:.1e} ({r[k][m]['max_rel']:.1e})" for m in ("fp32", "fp64", "reference fp32 vs fp64"))
                + " |")
    lines += ["", "Leaky-ReLU inputs of D (random images) on the other side of zero in fp32 than in fp64 (each such "
              "input switches its slope between 1 and 0.2: the logit stays continuous, its input gradient jumps):", ""]
    for r in result["outputs"]:
        f = r["branch flips fp32 vs fp64 (D, random images)"]
        lines.append(f"- {r['setting']}, {r['classes']} classes: gan_dist {f['gan_dist']}, reference {f['reference']} "
                     f"of {r['activations (D, random images)']:,}")
    lines += ["", "Cells: max abs (max rel). fp64 shows whether a difference is arithmetic or rounding: the same "
              "function gives ~1e-15 there; the last column is the fp32 rounding of the reference itself at these "
              "weights, the floor the fp32 column is measured against.", "",
              f"Largest relative difference in fp32: **{result['max_rel']:.1e}** (the reference's own fp32 rounding "
              f"reaches {result['max_rel_reference_fp32_rounding']:.1e}); in fp64: **{result['max_rel_fp64']:.1e}**.", "",
              f"## With {result['bf16_stages']} bf16 stages", "",
              f"gan_dist with `model.r3gan.bf16_stages={result['bf16_stages']}` (train.precision=fp32) against the "
              f"reference with the same stages in bf16 (`FP16Stages`, set as its training/networks.py does: G's last "
              f"{result['bf16_stages']}, D's first {result['bf16_stages']}), the same fp32 weights and inputs as above. "
              "The reference's own bf16 stages against its fp32 is the size of bf16 rounding, the floor.", "",
              "| setting | classes | quantity | bf16 stages: gan_dist vs reference | bf16 rounding: reference bf16 "
              "stages vs its fp32 | gan_dist bf16 stages vs its fp32 |", "|---|---|---|---|---|---|"]
    for r in result["outputs"]:
        for i, k in enumerate(keys):
            head = f"| {r['setting']} | {r['classes']} " if i == 0 else "| | "
            lines.append(head + f"| {k} | " + " | ".join(
                f"{r[k][m]['max_abs']:.1e} ({r[k][m]['max_rel']:.1e})"
                for m in ("bf16 stages", "reference bf16 stages vs fp32", "gan_dist bf16 stages vs fp32")) + " |")
    lines += ["", f"Largest relative difference with the bf16 stages: **{result['max_rel_bf16_stages']:.1e}** "
              f"(the reference's bf16 stages are off its fp32 by up to {result['max_rel_reference_bf16_rounding']:.1e}).",
              "",
              "## Initialisation", "",
              "Per layer, the weight's std pooled over the draws (seeds 0..draws-1 on each side; the two sides draw "
              "in different orders, so the check is statistical): gan_dist's / the reference's, against a tolerance "
              "5/sqrt(2n) for n pooled values (about 3.5 sampling errors of the ratio, 1/sqrt(n)). Zero-initialised layers count as equal when both are exactly zero.", ""]
    for s in result["init"]:
        bad = [r for r in s["layers"] if not r["ok"]]
        ratios = [r["ratio"] for r in s["layers"] if r["std_reference"]]
        zeros = sum(1 for r in s["layers"] if not r["std_reference"] and not r["std_gan_dist"])
        lines.append(f"- {s['setting']}, {s['classes']} classes, {s['draws']} draws: {len(s['layers'])} layers, "
                     f"ratios {min(ratios):.4f} .. {max(ratios):.4f}, {zeros} zero on both sides; "
                     f"worst |ratio - 1| / tolerance {s['worst_deviation_over_tolerance']}"
                     + (f"; **outside**: {', '.join(r['layer'] + ' ' + str(r['ratio']) for r in bad)}" if bad else ""))
    lines.append("")
    path.write_text("\n".join(lines))


def check_outputs(ref: Path, revision: str, args: argparse.Namespace) -> None:
    import_reference(ref)
    outputs = [compare_outputs(setting, classes, batch, args.seed)
               for setting, batch in (("digits", 4), ("cifar10", args.check_batch)) for classes in (0, 10)]
    for r in outputs:
        print(json.dumps(r))
    init = [init_statistics(setting, classes, draws)
            for setting, draws in (("digits", args.init_draws), ("cifar10", 2)) for classes in (0, 10)]
    for s in init:
        print(s["setting"], s["classes"], "init within tolerance:", s["all_within_tolerance"],
              s["worst_deviation_over_tolerance"])
    keys = [k for k in outputs[0] if isinstance(outputs[0][k], dict) and "fp32" in outputs[0][k]]
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
              "reference": {"repo": "brownvc/R3GAN", "revision": revision}, "threads": args.threads,
              "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
              "outputs": outputs, "max_rel": max(r[k]["fp32"]["max_rel"] for r in outputs for k in keys),
              "max_rel_fp64": max(r[k]["fp64"]["max_rel"] for r in outputs for k in keys),
              "max_rel_reference_fp32_rounding": max(r[k]["reference fp32 vs fp64"]["max_rel"] for r in outputs for k in keys),
              "bf16_stages": CHECK_BF16_STAGES,
              "max_rel_bf16_stages": max(r[k]["bf16 stages"]["max_rel"] for r in outputs for k in keys),
              "max_rel_reference_bf16_rounding": max(r[k]["reference bf16 stages vs fp32"]["max_rel"]
                                                     for r in outputs for k in keys),
              "init": init}
    out = Path(args.out) if args.out else RESULTS / "r3gan_reference_outputs.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    write_check_markdown(result, out.with_suffix(".md"))
    print("largest relative difference", result["max_rel"], "with bf16 stages", result["max_rel_bf16_stages"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ref", required=True, help="a checkout of brownvc/R3GAN")
    p.add_argument("--model", default="r3gan-cifar10", choices=list(RECIPES))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--iters", type=int, default=2, help="iterations per timed block")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--precision", choices=["fp32", "preset", "stages"], default="fp32",
                   help="fp32 on both sides; preset: each side's mixed precision for the preset, the reference's "
                        "bf16 stages (its FP16Stages), gan_dist's train.precision=bf16 (autocast, every stage); "
                        "stages: both with the preset's bf16 stages (gan_dist's model.r3gan.bf16_stages=preset)")
    p.add_argument("--revision", default=None, help="the reference's commit, when --ref is not a git work tree")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for both sides' sizes, e.g. model.r3gan.widths=[64,64,64,64]")
    p.add_argument("--out", default=None, help="JSON result (default: benchmarks/results/r3gan_reference_cpu.json)")
    p.add_argument("--check-outputs", action="store_true",
                   help="instead of timing: the same weights in both sides' G and D, compare images, logits and the "
                        "R1 gradients (fp32), and both sides' per-layer init std; writes r3gan_reference_outputs.*")
    p.add_argument("--check-batch", type=int, default=2, help="--check-outputs: the batch at the cifar10 widths")
    p.add_argument("--init-draws", type=int, default=200, help="--check-outputs: initialisations per side (digits)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ref = Path(args.ref).resolve()
    revision = args.revision or subprocess.run(["git", "-C", str(ref), "rev-parse", "HEAD"], capture_output=True,
                                               text=True).stdout.strip()
    if args.check_outputs:
        check_outputs(ref, revision, args)
        return

    ours, ours_info = gan_dist_side(args.model, args.batch_size, args.precision, args.overrides)
    theirs, theirs_info = reference_side(ref, args.model, ours_info.pop("cfg"), args.batch_size, args.precision)
    rows = alternate({"gan_dist": ours, "reference": theirs}, args.batch_size, args.iters, args.repeats, digits=2)
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "reference": {"repo": "brownvc/R3GAN", "revision": revision},
        "model": args.model, "overrides": args.overrides, "batch_size": args.batch_size, "iters_per_block": args.iters,
        "repeats": args.repeats, "threads": args.threads,
        "precision": ("fp32" if args.precision == "fp32" else
                      {"gan_dist": ("bf16 autocast" if args.precision == "preset" else
                                    f"model.r3gan.bf16_stages=preset ({len(RECIPES[args.model]['bf16_stages'])}), "
                                    "fp32 elsewhere"),
                       "reference": f"bf16 stages {RECIPES[args.model]['bf16_stages']} of G "
                                    "(and D's at the same resolutions), fp32 elsewhere"}),
        "recipe": {"loss": "rpgan", "gamma": RECIPES[args.model]["gamma"], "r1_r2_every": 1,
                   "lr": RECIPES[args.model]["lr"], "betas": [0, RECIPES[args.model]["beta2"]]},
        "params": {"gan_dist": ours_info["params"], "reference": theirs_info["params"]},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__},
        "rows": rows,
        "speedup": round(rows["gan_dist"]["img_per_sec"] / rows["reference"]["img_per_sec"], 3),
    }
    name = {"fp32": "r3gan_reference_cpu", "preset": "r3gan_reference_cpu_mixed", "stages": "r3gan_reference_cpu_stages"}
    out = Path(args.out) if args.out else RESULTS / f"{name[args.precision]}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    write_markdown(result, out.with_suffix(".md"))


if __name__ == "__main__":
    main()
