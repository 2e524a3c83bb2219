"""Sample a trained generator: a grid, a folder of PNGs, or WebDataset shards.

    python -m gan_dist.generate --ckpt runs/20260101-120000 --n 64 --out grid.png
    python -m gan_dist.generate --ckpt runs/20260101-120000 --n 50000 --out samples/        # PNG files
    torchrun --nproc_per_node 8 -m gan_dist.generate --ckpt RUN --n 1000000 --out gen/samples.tar

`--ckpt` is a run directory (config.yaml + generator.pt, and generator_ema.pt when the run
kept an EMA, which is then used unless --no-ema), a generator .pt file next to its
config.yaml, or a training checkpoint (a `step*` directory, or a run directory holding only
checkpoints/). Launched with several processes, each rank makes its share of the N samples;
sample i is the same image whatever the number of processes.

A conditional generator (model.num_classes > 0) draws class `i % num_classes` for sample i,
or only `--class K`; its grid has one row per class (the N images split evenly over the rows),
and its shards carry each image's class as `.cls`.

    python -m gan_dist.generate --ckpt RUN --n 100 --out grid.png             # 10 rows: digits 0-9
    python -m gan_dist.generate --ckpt RUN --n 64 --class 3 --out threes.png
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from gan_dist.cli import UsageError, add_weights_args, run_cli

GRID_SUFFIXES = (".png", ".jpg", ".jpeg")


class GeneratorSourceError(UsageError):
    """--ckpt names something that holds no generator; the message says what was looked for."""


@dataclass
class LoadedGenerator:
    G: nn.Module
    cfg: Any  # the run's Config
    source: str  # the file (or checkpoint) the weights came from
    ema: bool  # whether they are the EMA weights
    step: Optional[int]  # the training step, where known


def _config_near(path: Path) -> Path:
    for d in (path.parent, path.parent.parent):
        if (d / "config.yaml").is_file():
            return d / "config.yaml"
    raise GeneratorSourceError(f"--ckpt {str(path)!r}: no config.yaml next to it (or one level up); "
                               "it is needed to rebuild the generator")


def _load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, not a torch file, refused globals
        raise GeneratorSourceError(f"cannot read {str(path)!r}: {str(exc).splitlines()[0][:200]}") from None


def _run_step(run_dir: Path) -> Optional[int]:
    try:
        return int(json.loads((run_dir / "run_info.json").read_text())["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _checkpoint_state(ckpt: Path, ema: Optional[bool]) -> tuple[dict, bool, str, dict]:
    """G's state_dict from a training checkpoint (EMA parameters over it when asked and present)."""
    from gan_dist.checkpoint import GENERATOR_FILE, TRAINER_FILE
    from gan_dist.parallel.base import MODELS_FILE
    from gan_dist.parallel.fsdp import CHECKPOINT_DIR as FSDP_DIR

    trainer = _load(ckpt / TRAINER_FILE)
    if (ckpt / GENERATOR_FILE).is_file():  # G's full weights, whatever the strategy
        state = dict(_load(ckpt / GENERATOR_FILE))
    elif (ckpt / MODELS_FILE).is_file():
        state = dict(_load(ckpt / MODELS_FILE)["models"]["G"])
    elif (ckpt / FSDP_DIR).is_dir():
        state = _fsdp_generator_state(ckpt / FSDP_DIR, trainer)
    else:
        raise GeneratorSourceError(f"checkpoint {str(ckpt)!r} holds no {GENERATOR_FILE}, {MODELS_FILE} or {FSDP_DIR}/: "
                                   f"written by parallel.strategy={trainer.get('strategy')!r}, which this command "
                                   f"cannot read; finish or resume the run to get {GENERATOR_FILE}")
    ema_params = ((trainer.get("ema") or {}).get("params")) if isinstance(trainer, dict) else None
    if ema is True and ema_params is None:
        raise GeneratorSourceError(f"--ema: checkpoint {str(ckpt)!r} holds no EMA (trained with ema.enabled=false)")
    use_ema = ema is not False and ema_params is not None
    if use_ema:
        state.update(ema_params)
    return state, use_ema, str(ckpt), trainer


def _fsdp_generator_state(dcp_dir: Path, trainer: dict) -> dict:
    """G's full state_dict from a torch.distributed.checkpoint directory, in this one process."""
    import torch.distributed.checkpoint as dcp

    from gan_dist.config import load_config
    from gan_dist.models import build_generator

    cfg = load_config(dcp_dir.parent / "config.yaml", upgrade=True)
    template = build_generator(cfg.model).state_dict()
    wanted = {"G": {"model": template}}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(wanted, checkpoint_id=str(dcp_dir), no_dist=True)
    return wanted["G"]["model"]


def resolve_source(ckpt: str, ema: Optional[bool]) -> tuple[Path, dict, bool, str, Optional[int]]:
    """(config.yaml, G state_dict, is EMA, source description, step) for any --ckpt form."""
    from gan_dist.checkpoint import CHECKPOINTS_DIR, LATEST, TRAINER_FILE, find_checkpoint, is_checkpoint

    path = Path(ckpt)
    if not path.exists():
        raise GeneratorSourceError(f"--ckpt {ckpt!r} does not exist")
    if path.is_file():
        state = _load(path)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise GeneratorSourceError(f"--ckpt {ckpt!r} is not a generator state_dict (generator.pt)")
        return _config_near(path), state, "ema" in path.stem, str(path), _run_step(path.parent)
    if not is_checkpoint(path) and ((path / "generator.pt").is_file() or (path / "generator_ema.pt").is_file()):
        has_ema = (path / "generator_ema.pt").is_file()
        if ema is True and not has_ema:
            raise GeneratorSourceError(f"--ema: {ckpt!r} has no generator_ema.pt (trained with ema.enabled=false)")
        name = "generator_ema.pt" if has_ema and ema is not False else "generator.pt"
        if not (path / name).is_file():
            raise GeneratorSourceError(f"--no-ema: {ckpt!r} has no generator.pt")
        return _config_near(path / name), _load(path / name), name == "generator_ema.pt", str(path / name), \
            _run_step(path)
    ckpt_dir = find_checkpoint(path)
    if ckpt_dir is None:
        raise GeneratorSourceError(f"--ckpt {ckpt!r}: no generator.pt, generator_ema.pt, checkpoint ({TRAINER_FILE}) "
                                   f"or {CHECKPOINTS_DIR}/{LATEST} found there")
    state, use_ema, source, trainer = _checkpoint_state(ckpt_dir, ema)
    step = trainer.get("step") if isinstance(trainer, dict) else None
    config = ckpt_dir / "config.yaml" if (ckpt_dir / "config.yaml").is_file() else _config_near(ckpt_dir)
    return config, state, use_ema, source, step


def state_family(state: dict) -> Optional[str]:
    """The family whose generator has these parameter names (layer indices aside), or None.

    Each family's G is built small on the meta device; names differ completely between families
    (mapping./synthesis., blocks., stages.), so the best overlap tells a foreign state apart from
    a same-family one of another size."""
    import re

    from gan_dist.config import load_config
    from gan_dist.models import FAMILIES, build_generator

    pattern = lambda keys: {re.sub(r"\.\d+(?=\.|$)", ".*", k) for k in keys}  # noqa: E731
    own, best, best_score = pattern(state), None, 0.5
    for family in FAMILIES:
        try:
            cfg = load_config(None, [f"model.arch={family}", "model.resolution=32", "model.channels=1"])
            with torch.device("meta"):
                names = pattern(build_generator(cfg.model).state_dict())
        except Exception:  # a family without a 32 px default: it cannot be told here
            continue
        score = len(own & names) / max(1, len(own | names))
        if score > best_score:
            best, best_score = family, score
    return best


def load_generator(ckpt: str, ema: Optional[bool] = None, device: torch.device = torch.device("cpu"),
                   overrides: Optional[list[str]] = None) -> LoadedGenerator:
    """The generator of a run or checkpoint, rebuilt from its config.yaml, in eval mode.

    `ema`: None prefers the EMA weights where they exist; True requires them; False refuses them.
    """
    from gan_dist.checkpoint import CheckpointError, load_model_state
    from gan_dist.config import load_config
    from gan_dist.models import build_generator

    config, state, is_ema, source, step = resolve_source(ckpt, ema)
    cfg = load_config(config, overrides or [], upgrade=True)  # a run's config.yaml, maybe an older gan_dist's
    G = build_generator(cfg.model)
    try:
        load_model_state(G, state, f"generator ({source})")
    except CheckpointError as exc:
        family = state_family(state)
        if family is not None and family != cfg.model.arch:
            raise GeneratorSourceError(
                f"--ckpt {ckpt!r}: the weights in {source} are a model.arch={family} generator (by their "
                f"parameter names), but {config} says model.arch={cfg.model.arch}; pass the {family} run's own "
                f"directory, or put the config.yaml of the run that trained them next to them") from None
        raise GeneratorSourceError(str(exc)) from None
    return LoadedGenerator(G.to(device).eval().requires_grad_(False), cfg, source, is_ema, step)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (N, C, H, W) -> uint8 (N, H, W, C), as the demo shards store images."""
    return ((images.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


class Classes:
    """The class of each sample of a conditional generator: `fixed` for all, else i // per_row
    (a grid with one row per class) or i % num_classes."""

    def __init__(self, num_classes: int, fixed: Optional[int] = None, per_row: Optional[int] = None) -> None:
        self.num_classes, self.fixed, self.per_row = num_classes, fixed, per_row

    def __call__(self, lo: int, hi: int) -> Optional[torch.Tensor]:
        if not self.num_classes:
            return None
        i = torch.arange(lo, hi)
        if self.fixed is not None:
            return torch.full_like(i, self.fixed)
        return (i // self.per_row) % self.num_classes if self.per_row else i % self.num_classes


@torch.no_grad()
def generate_range(G: nn.Module, start: int, end: int, seed: int, batch_size: int, device: torch.device,
                   classes: Optional[Classes] = None):
    """Yield (first index, images in [-1, 1]) for samples [start, end), batch by batch."""
    from gan_dist.metrics.shares import latents

    for lo in range(start, end, batch_size):
        hi = min(end, lo + batch_size)
        c = classes(lo, hi) if classes is not None else None
        yield lo, G(latents(lo, hi, G.z_dim, seed).to(device), None if c is None else c.to(device)).float()


def write_grid(G: nn.Module, n: int, out: Path, seed: int, batch_size: int, device: torch.device,
               image_shape: tuple[int, int, int], classes: Optional[Classes] = None) -> None:
    """All N images gathered on rank 0 into one grid PNG (one row per class for a conditional
    generator without --class)."""
    from gan_dist import distributed as gdist
    from gan_dist.runlog import save_grid
    from gan_dist.metrics.shares import gather_rows, share, share_counts

    start, end = share(n, gdist.rank(), gdist.world_size())
    parts = [x.cpu() for _, x in generate_range(G, start, end, seed, batch_size, device, classes)]
    mine = torch.cat(parts) if parts else torch.empty(0, *image_shape)
    images = gather_rows(mine, share_counts(n, gdist.world_size()))
    if images is None:
        return
    if classes is not None and classes.per_row:
        import torchvision.utils as vutils

        out.parent.mkdir(parents=True, exist_ok=True)
        vutils.save_image(vutils.make_grid(images.float(), nrow=classes.per_row, padding=2, normalize=True,
                                           value_range=(-1, 1)), str(out))
    else:
        save_grid(images, out)


def write_pngs(G: nn.Module, n: int, out: Path, seed: int, batch_size: int, device: torch.device,
               classes: Optional[Classes] = None) -> int:
    """This rank's share as out/{index}.png; returns how many it wrote."""
    from PIL import Image

    from gan_dist import distributed as gdist
    from gan_dist.metrics.shares import share

    start, end = share(n, gdist.rank(), gdist.world_size())
    width = max(6, len(str(n - 1)))
    out.mkdir(parents=True, exist_ok=True)
    for lo, images in generate_range(G, start, end, seed, batch_size, device, classes):
        for i, arr in enumerate(to_uint8(images).numpy()):
            Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(out / f"{lo + i:0{width}d}.png")
    return end - start


def write_shards(G: nn.Module, n: int, out: Path, seed: int, batch_size: int, device: torch.device,
                 shard_size: int, meta: dict, classes: Optional[Classes] = None) -> Optional[Path]:
    """This rank's share as `{stem}-{rank}-{k}.tar` shards; rank 0 writes manifest.json for all."""
    from gan_dist import distributed as gdist
    from gan_dist.data.writer import ShardSink, encode, write_manifest
    from gan_dist.metrics.shares import share

    rank, world = gdist.rank(), gdist.world_size()
    start, end = share(n, rank, world)
    out.parent.mkdir(parents=True, exist_ok=True)
    sink = ShardSink(out.parent, f"{out.stem}-{rank:05d}", max_count=shard_size)
    width = max(8, len(str(n - 1)))
    for lo, images in generate_range(G, start, end, seed, batch_size, device, classes):
        labels = classes(lo, lo + len(images)) if classes is not None else None
        for i, arr in enumerate(to_uint8(images).numpy()):
            members = {"png": encode(arr, "png")}
            if labels is not None:
                members["cls"] = str(int(labels[i])).encode()
            sink.write(f"{lo + i:0{width}d}", members)
    mine = sink.close()
    entries = gdist.all_gather_object(mine)
    if rank != 0:
        return None
    flat = [e for part in entries for e in part]
    return write_manifest(out.parent, flat, image_format="png", **meta)


def output_kind(out: str) -> str:
    suffix = Path(out).suffix.lower()
    if suffix in GRID_SUFFIXES:
        return "grid"
    if suffix == ".tar":
        return "shards"
    return "dir"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gan_dist.generate", description="Sample a trained gan_dist generator.")
    p.add_argument("--ckpt", required=True, help="run directory, generator .pt file or training checkpoint")
    p.add_argument("--n", type=int, required=True, help="number of images")
    p.add_argument("--out", required=True,
                   help="grid.png (one grid), a directory (one PNG per image) or name.tar (shards + manifest.json)")
    p.add_argument("--seed", type=int, default=0, help="latent seed: sample i is the same for every process count")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--shard-size", type=int, default=10_000, help="images per shard (name.tar output)")
    p.add_argument("--truncation", type=float, default=1.0, metavar="PSI",
                   help="StyleGAN2's truncation: w pulled toward its tracked average, psi in [0, 1] (1: none)")
    p.add_argument("--class", dest="cls", type=int, default=None, metavar="K",
                   help="a conditional generator: every image of class K (default: class i %% num_classes "
                        "for image i; a grid has one row per class)")
    add_weights_args(p)
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("--n must be >= 1")
    if args.batch_size < 1 or args.shard_size < 1:
        p.error("--batch-size and --shard-size must be >= 1")
    if not 0 <= args.truncation <= 1:
        p.error(f"--truncation={args.truncation:g} must be in [0, 1] (1: no truncation)")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)

    def body(info: Any) -> None:
        from gan_dist import distributed as gdist

        loaded = load_generator(args.ckpt, args.ema, info.device)
        if args.truncation != 1:
            if not hasattr(loaded.G, "truncation_psi"):
                raise UsageError(f"--truncation {args.truncation:g}: model.arch={loaded.cfg.model.arch} has no "
                                 "truncation (model.arch=stylegan2 has)")
            loaded.G.truncation_psi = args.truncation  # the default of every G(z) below
        kind = output_kind(args.out)
        out = Path(args.out)
        K = int(loaded.cfg.model.num_classes or 0)
        if args.cls is not None and not K:
            raise UsageError(f"--class {args.cls}: the generator of {args.ckpt!r} is unconditional "
                             "(model.num_classes=0)")
        if args.cls is not None and not 0 <= args.cls < K:
            raise UsageError(f"--class {args.cls}: the generator has classes 0 to {K - 1} (model.num_classes={K})")
        per_row = -(-args.n // K) if K and kind == "grid" and args.cls is None else None
        classes = Classes(K, args.cls, per_row) if K else None
        if kind == "grid":
            m = loaded.cfg.model
            write_grid(loaded.G, args.n, out, args.seed, args.batch_size, info.device,
                       (m.channels, m.resolution, m.resolution), classes)
        elif kind == "dir":
            write_pngs(loaded.G, args.n, out, args.seed, args.batch_size, info.device, classes)
        else:
            meta = {"resolution": loaded.cfg.model.resolution, "channels": loaded.cfg.model.channels,
                    "source": {"ckpt": loaded.source, "ema": loaded.ema, "seed": args.seed, "n": args.n,
                               "class": args.cls}}
            if K:
                meta.update(num_classes=K, labelled=args.n)
            write_shards(loaded.G, args.n, out, args.seed, args.batch_size, info.device, args.shard_size, meta,
                         classes)
        gdist.barrier()
        if info.is_main:
            print(json.dumps({"out": str(out), "kind": kind, "n": args.n, "class": args.cls, "weights": loaded.source,
                              "ema": loaded.ema, "step": loaded.step, "world_size": info.world_size}))

    return run_cli("gan_dist.generate", body)


if __name__ == "__main__":
    sys.exit(main())
