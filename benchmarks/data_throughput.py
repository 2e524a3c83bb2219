"""Loader throughput: decoded images/s of gan_dist's shard reader against torchvision's ImageFolder.

    python benchmarks/data_throughput.py          # the full sweep (about 30 min on a busy 2-core machine)
    python benchmarks/data_throughput.py --resolutions 64 --formats png raw --images 512 --seconds 1

For each resolution (32, 64, 128, 256) the same source images (synthetic, photo-like: smooth
shapes, gradients and sensor-like noise) are written once as png, jpg and raw shards with
`gan_dist.shards` and once as individual png and jpg files for ImageFolder. Each reader then
delivers batches of float tensors in [-1, 1] (ImageFolder with the DCGAN example's
ToTensor + Normalize) for at least --seconds, with 1 loader worker and with N (and gan_dist's
decoding alone, in this process: the uint8 batches a worker makes); the best of
--repeats rounds over all settings is kept, since the machine is shared. The DCGAN-64
training step of configs/dcgan_64.yaml is timed on synthetic batches in the same run, to
compare what the loader delivers with what training consumes (measured one after the other:
on a machine where they share the cores, training leaves the loader less).

Writes JSON and a Markdown table (default: benchmarks/results/data_throughput.{json,md}).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


# ---- source images --------------------------------------------------------------------------------
def photo_like(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth scene (gradient, soft blobs) with texture and noise: compresses like a photo."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.empty((size, size, 3), np.float32)
    for c in range(3):
        a, b, d = rng.uniform(-80, 80, 3)
        img[..., c] = 128 + a * x + b * y + d * x * y
    for _ in range(rng.integers(3, 8)):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.35)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        img += blob[..., None] * rng.uniform(-90, 90, 3)
    freq = rng.uniform(8, 40)
    img += 12 * np.sin(2 * np.pi * freq * (x + 0.3 * y))[..., None]  # texture
    img += rng.normal(0, 4, img.shape)  # sensor noise
    return np.clip(img, 0, 255).astype(np.uint8)


def make_sources(root: Path, n: int, size: int = 256, classes: int = 4) -> Path:
    from PIL import Image

    src = root / "src"
    if (src / ".done").exists():
        return src
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = src / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo_like(rng, size)).save(folder / f"img{i:06d}.png")
    (src / ".done").touch()
    return src


def image_folder_copy(src: Path, out: Path, resolution: int, fmt: str) -> Path:
    """The source images as individual files at `resolution`, as a user's folder would hold them."""
    from PIL import Image

    from gan_dist.data.writer import find_images, load_image

    if (out / ".done").exists():
        return out
    files, classes = find_images(src)
    for path, label in files:
        folder = out / classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(load_image(path, 3, resolution))
        name = Path(path).stem
        if fmt == "png":
            img.save(folder / f"{name}.png")
        else:
            img.save(folder / f"{name}.jpg", quality=95)
    (out / ".done").touch()
    return out


def shards_copy(src: Path, out: Path, resolution: int, fmt: str, workers: int, max_count: int = 256) -> Path:
    from gan_dist.data.writer import WriteOptions, write_folder

    if not (out / "manifest.json").exists():
        write_folder(src, out, f"r{resolution}", WriteOptions(resolution, 3, fmt), max_count=max_count,
                     workers=workers, progress=False)
    return out


# ---- timing ------------------------------------------------------------------------------------------
def rate(batches: Iterator[torch.Tensor], seconds: float, warmup: int = 3, min_batches: int = 5) -> tuple[float, int]:
    """(images/s, images timed) after `warmup` batches (worker start-up, shuffle buffers)."""
    for _ in range(warmup):
        next(batches)
    n, count = 0, 0
    started = time.perf_counter()
    while True:
        x = next(batches)
        n += x.shape[0]
        count += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds and count >= min_batches:
            return n / elapsed, n


def gan_dist_batches(shard_dir: Path, resolution: int, workers: int,
                     batch: int) -> tuple[Iterator[torch.Tensor], Callable[[], None]]:
    from gan_dist.config import DataConfig
    from gan_dist.data import build_loader, resolve_shards

    cfg = DataConfig(urls=str(shard_dir), num_workers=workers)
    shards = resolve_shards(cfg, need_counts=True, log=lambda m: None)
    loader = build_loader(shards, cfg, 3, resolution, batch, 0, 0, 1, torch.device("cpu"), log=lambda m: None)
    return loader, loader.close


def decode_only_batches(shard_dir: Path, resolution: int, batch: int) -> tuple[Iterator[torch.Tensor], Callable[[], None]]:
    """One reader slot run in this process: what a loader worker decodes (uint8 batches), without
    the transfer between processes and the scaling to floats."""
    from gan_dist.config import DataConfig
    from gan_dist.data import resolve_shards
    from gan_dist.data.reader import ReaderSpec, SlotReader

    cfg = DataConfig(urls=str(shard_dir))
    shards = resolve_shards(cfg, need_counts=True, log=lambda m: None)
    spec = ReaderSpec(urls=tuple(shards.urls), counts=tuple(shards.counts or ()), mode="epoch", remainder="pad",
                      seed=0, rank=0, world_size=1, workers=1, batch_size=batch, channels=3,
                      resolution=resolution, shuffle_buffer=cfg.shuffle_buffer, flip=False)
    it = (b["images"] for b in SlotReader(spec, 0).batches([0, 0, 0]))
    return it, it.close


def image_folder_batches(folder: Path, workers: int, batch: int) -> tuple[Iterator[torch.Tensor], Callable[[], None]]:
    """torchvision's ImageFolder with the transform of the PyTorch DCGAN example (sizes already right)."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(folder), transform=T.Compose([T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)]))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                         persistent_workers=workers > 0, drop_last=True)

    def endless() -> Iterator[torch.Tensor]:
        while True:
            for images, _ in loader:
                yield images

    it = endless()
    return it, it.close


def train_step_rate(seconds: float) -> dict[str, Any]:
    """Images/s of the DCGAN-64 training step of configs/dcgan_64.yaml on synthetic batches."""
    from gan_dist.config import load_config
    from gan_dist.distributed import DistInfo
    from gan_dist.build import setup_models
    from gan_dist.loop import Batch, train_step
    from gan_dist.parallel import build_strategy

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "dcgan_64.yaml")
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # as the trainer gives one process: all cores
    info = DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0,
                    device=torch.device("cpu"), backend=None, launcher="python")
    strategy = build_strategy(info, cfg)
    recipe, spec, _ = setup_models(strategy, cfg)
    t, m = cfg.train, cfg.model
    gen = torch.Generator().manual_seed(0)
    real = torch.rand(t.batch_size, m.channels, m.resolution, m.resolution, generator=gen) * 2 - 1

    def batches() -> list[list[Batch]]:
        return [[Batch(real, torch.randn(t.batch_size, spec.z_dim, generator=gen)) for _ in range(t.grad_accum)]
                for _ in range(t.d_steps)]

    for _ in range(2):
        train_step(strategy, recipe, batches())
    n, started = 0, time.perf_counter()
    while True:
        train_step(strategy, recipe, batches())
        n += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds and n >= 3:
            break
    strategy.close()
    per_step = t.batch_size * t.grad_accum * t.d_steps
    out = {"config": "configs/dcgan_64.yaml", "batch_size": t.batch_size, "precision": t.precision,
           "resolution": m.resolution, "channels": m.channels, "ngf": m.dcgan.ngf, "ndf": m.dcgan.ndf,
           "data_num_workers": cfg.data.num_workers, "flip": cfg.data.flip,
           "threads": torch.get_num_threads(), "img_per_sec": per_step * n / elapsed}
    torch.set_num_threads(threads)
    return out


# ---- the sweep ---------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    cores = os.cpu_count() or 1
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1024, help="source images (default 1024)")
    p.add_argument("--resolutions", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--formats", nargs="+", default=["png", "jpg", "raw"], choices=["png", "jpg", "raw"])
    p.add_argument("--workers", type=int, nargs="+", default=sorted({1, cores}),
                   help=f"loader worker counts (default: 1 and {cores}, this machine's cores)")
    p.add_argument("--batch-size", type=int, default=128, help="as configs/dcgan_64.yaml (default 128)")
    p.add_argument("--seconds", type=float, default=2.0, help="timed seconds per run (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="rounds over all settings, best kept (default 3)")
    p.add_argument("--no-image-folder", action="store_true", help="skip the ImageFolder baseline")
    p.add_argument("--no-train-step", action="store_true", help="skip timing the DCGAN-64 training step")
    p.add_argument("--workdir", help="where the images and shards go (default: a temporary directory)")
    p.add_argument("--vs-webdataset", action="store_true",
                   help="instead: gan_dist's reader against webdataset's pipeline and wids on the same shards "
                        "(64 px png and raw; speed and properties)")
    p.add_argument("--json", help="default: benchmarks/results/data_throughput.json "
                                  "(--vs-webdataset: data_throughput.webdataset.json)")
    p.add_argument("--md", help="default: the --json path with .md")
    args = p.parse_args(argv)
    stem = "data_throughput.webdataset" if args.vs_webdataset else "data_throughput"
    args.json = args.json or str(RESULTS / f"{stem}.json")
    args.md = args.md or str(Path(args.json).with_suffix(".md"))
    return args


def environment() -> dict[str, Any]:
    from importlib import metadata

    versions = {}
    for name in ("torch", "torchvision", "webdataset", "pillow", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "versions": versions,
            "loadavg_start": list(os.getloadavg()), "date": time.strftime("%Y-%m-%d %H:%M")}


def measure(reader: str, fmt: str, res: int, path: Path, workers: int, batch: int, seconds: float) -> tuple[float, int]:
    if reader == "gan_dist" and workers == 0:
        batches, close = decode_only_batches(path, res, batch)
    elif reader == "gan_dist":
        batches, close = gan_dist_batches(path, res, workers, batch)
    else:
        batches, close = image_folder_batches(path, workers, batch)
    try:
        return rate(batches, seconds)
    finally:
        close()


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.vs_webdataset:
        return compare_main(args)
    torch.set_num_threads(1)  # the measuring process only receives batches; workers decode
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="data-throughput-"))
    result: dict[str, Any] = {"env": environment(), "args": vars(args), "rows": []}
    src = make_sources(work, args.images)
    print(f"source: {args.images} images of 256 px in {src}", file=sys.stderr)
    cores = os.cpu_count() or 1
    settings: list[dict[str, Any]] = []
    for res in args.resolutions:
        for fmt in args.formats:
            path = shards_copy(src, work / f"shards-{fmt}-{res}", res, fmt, cores)
            # 0 workers: gan_dist's decoding alone, in this process (what one loader worker can do)
            settings += [{"reader": "gan_dist", "format": fmt, "resolution": res, "workers": w, "path": path}
                         for w in [0, *args.workers]]
        for fmt in ("png", "jpg"):
            if fmt in args.formats and not args.no_image_folder:
                path = image_folder_copy(src, work / f"files-{fmt}-{res}", res, fmt)
                settings += [{"reader": "ImageFolder", "format": fmt, "resolution": res, "workers": w, "path": path}
                             for w in args.workers]
    # rounds over all settings, best of each: a load burst on the shared machine hits one round
    best: dict[int, tuple[float, int]] = {}
    runs: dict[int, list[float]] = {k: [] for k in range(len(settings))}
    steps: list[dict[str, Any]] = []
    for round_ in range(args.repeats):
        for k, st in enumerate(settings):
            r, n = measure(st["reader"], st["format"], st["resolution"], st["path"], st["workers"],
                           args.batch_size, args.seconds)
            runs[k].append(round(r, 1))
            if r > best.get(k, (0.0, 0))[0]:
                best[k] = (r, n)
            print(f"round {round_ + 1}: {st['reader']:12s} {st['format']:4s} {st['resolution']:4d} px "
                  f"{st['workers']} worker(s): {r:9.1f} img/s", file=sys.stderr)
        if not args.no_train_step:
            steps.append(train_step_rate(max(args.seconds, 3.0)))
            print(f"round {round_ + 1}: DCGAN-64 training step: {steps[-1]['img_per_sec']:.1f} img/s", file=sys.stderr)
    for k, st in enumerate(settings):
        path = st.pop("path")
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != ".done")
        result["rows"].append({**st, "batch_size": args.batch_size, "img_per_sec": round(best[k][0], 1),
                               "runs": runs[k], "images_timed": best[k][1],
                               "bytes_per_image": round(size / args.images)})
    if steps:
        result["train_step"] = max(steps, key=lambda x: x["img_per_sec"])
    result["env"]["loadavg_end"] = list(os.getloadavg())
    result["checks"] = checks(result)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    write(result, args.json, args.md)
    return result


def _rate(rows: list[dict[str, Any]], **match: Any) -> Optional[float]:
    found = [r["img_per_sec"] for r in rows if all(r.get(k) == v for k, v in match.items())]
    return max(found) if found else None


def checks(result: dict[str, Any]) -> dict[str, Any]:
    """The two targets: loader >= 3x the DCGAN-64 step; raw decodes >= 5x faster than png at 64 px."""
    rows, out = result["rows"], {}
    nmax = max((r["workers"] for r in rows), default=1)

    def ours(fmt: str, workers: int) -> Optional[float]:
        return _rate(rows, reader="gan_dist", format=fmt, resolution=64, workers=workers)

    step = result.get("train_step", {}).get("img_per_sec")
    for fmt in ("png", "jpg", "raw"):
        if ours(fmt, nmax) and step:
            out[f"loader_{fmt}64_{nmax}_workers_over_train_step"] = round(ours(fmt, nmax) / step, 2)
    if ours("png", nmax) and step:
        out["loader_over_train_step_ok"] = ours("png", nmax) / step >= 3
    for workers in (0, 1, nmax):
        if ours("raw", workers) and ours("png", workers):
            out[f"raw_over_png_64px_{workers}_workers"] = round(ours("raw", workers) / ours("png", workers), 2)
    if "raw_over_png_64px_0_workers" in out:
        out["raw_over_png_decode_ok"] = out["raw_over_png_64px_0_workers"] >= 5
        raw_runs, png_runs = (next(r["runs"] for r in rows if r["reader"] == "gan_dist" and r["format"] == f
                                   and r["resolution"] == 64 and r["workers"] == 0) for f in ("raw", "png"))
        out["raw_over_png_64px_decode_per_round"] = [round(a / b, 2) for a, b in zip(raw_runs, png_runs)]
    for fmt in ("png", "jpg"):
        theirs = _rate(rows, reader="ImageFolder", format=fmt, resolution=64, workers=nmax)
        if ours(fmt, nmax) and theirs:
            out[f"gan_dist_over_image_folder_{fmt}_64px_{nmax}_workers"] = round(ours(fmt, nmax) / theirs, 2)
    return out


def markdown(result: dict[str, Any]) -> str:
    rows, env, a = result["rows"], result["env"], result["args"]
    workers = sorted({r["workers"] for r in rows})
    nmax = workers[-1]
    head = ["decode only" if w == 0 else f"{w} worker{'s' if w > 1 else ''}" for w in workers]
    lines = [
        "# Loader throughput",
        "",
        f"Images/s delivered as float tensors in [-1, 1], in batches of {a['batch_size']}, on {env['machine']} "
        f"with {env['cpus']} CPUs ({env['date']}; torch {env['versions']['torch']}, torchvision "
        f"{env['versions']['torchvision']}). {a['images']} synthetic photo-like images. Best of {a['repeats']} "
        f"rounds of {a['seconds']} s runs; load average {env['loadavg_start'][0]:.1f} at the start and "
        f"{env['loadavg_end'][0]:.1f} at the end (a shared machine: compare ratios within this table). "
        "\"decode only\": one gan_dist reader run in the measuring process (reading, shuffling, decoding, "
        "batching into uint8 tensors; no transfer between processes, no scaling to floats), "
        "i.e. what one loader worker decodes. The worker columns are end to end: float batches in the "
        "training process. Produced by:",
        "",
        "    python benchmarks/data_throughput.py",
        "",
        "| px | reader | format | bytes/img | " + " | ".join(head) + " |",
        "|---:|---|---|---:|" + "---:|" * len(workers),
    ]
    order = {f: i for i, f in enumerate(("png", "jpg", "raw"))}
    keys = sorted({(r["resolution"], r["reader"] != "gan_dist", r["format"]) for r in rows},
                  key=lambda k: (k[0], k[1], order[k[2]]))
    for res, is_folder, fmt in keys:
        reader = "ImageFolder" if is_folder else "gan_dist"
        size = next(r["bytes_per_image"] for r in rows if (r["resolution"], r["reader"], r["format"]) == (res, reader, fmt))
        cells = []
        for w in workers:
            v = _rate(rows, resolution=res, reader=reader, format=fmt, workers=w)
            cells.append(f"{v:,.0f}" if v else "-")
        label = "ImageFolder files" if is_folder else "gan_dist shards"
        lines.append(f"| {res} | {label} | {fmt} | {size:,} | " + " | ".join(cells) + " |")
    c = result.get("checks", {})
    step = result.get("train_step")
    lines.append("")
    if step:
        lines.append(f"DCGAN-64 training step ({step['config']}: batch {step['batch_size']}, {step['precision']}, "
                     f"{step['threads']} threads) on synthetic batches: **{step['img_per_sec']:.0f} img/s**.")
        lines.append("")
        ratios = ", ".join(f"{fmt} {c[k]}x" for fmt in ("png", "jpg", "raw")
                           if (k := f"loader_{fmt}64_{nmax}_workers_over_train_step") in c)
        if ratios:
            ok = "met" if c.get("loader_over_train_step_ok") else "NOT met"
            lines.append(f"- Loader at 64 px with {nmax} workers / training step: {ratios} "
                         f"(target >= 3x with png: {ok}).")
    if "raw_over_png_64px_0_workers" in c:
        ok = "met" if c.get("raw_over_png_decode_ok") else "NOT met"
        extra = ", ".join(f"{c[k]}x with {w} worker{'s' if w > 1 else ''}" for w in workers[1:]
                          if (k := f"raw_over_png_64px_{w}_workers") in c)
        per_round = ", ".join(f"{x}x" for x in c.get("raw_over_png_64px_decode_per_round", []))
        lines.append(f"- raw / png at 64 px: decoding {c['raw_over_png_64px_0_workers']}x (best against best; "
                     f"round by round {per_round}; target >= 5x: {ok}); end to end through the DataLoader {extra}.")
    for fmt in ("png", "jpg"):
        k = f"gan_dist_over_image_folder_{fmt}_64px_{nmax}_workers"
        if k in c:
            lines.append(f"- gan_dist shards / ImageFolder files, {fmt} at 64 px with {nmax} workers: {c[k]}x.")
    lines += ["", "The loader and the training step were timed one after the other. In training they share "
              "this machine's cores, so the ratio is the loader's headroom, not the speed of both at once."]
    return "\n".join(lines) + "\n"


def write(result: dict[str, Any], json_path: Optional[str], md_path: Optional[str]) -> None:
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    if md_path:
        Path(md_path).parent.mkdir(parents=True, exist_ok=True)
        Path(md_path).write_text(text)
    print(text)


# ---- gan_dist's reader against webdataset's own ----------------------------------------------------
# The same shards read three ways, each delivering float batches in [-1, 1] to this process:
# gan_dist's reader; webdataset.WebDataset split by node and worker with its decoder; and the
# indexed ShardListDataset of `wids` (shipped with webdataset up to 0.2.x, a package of its own
# since: webdataset 1.0.2 has none) with its chunked sampler. Speed is timed in rounds over all
# settings; the properties are tried on 2 simulated ranks x 2 workers in this process.
CMP_RES = 64
CMP_SHARD = 256  # samples per shard: the last one is short, so the shards are uneven


def _u8_to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(127.5).sub_(1.0)


def _chw(img: Any) -> torch.Tensor:
    """A decoded image (numpy HWC from .npy, or webdataset's torch CHW) as uint8 CHW."""
    if isinstance(img, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
    return img


def _collate(samples: list[tuple[str, torch.Tensor]]) -> tuple[list[str], torch.Tensor]:
    return [k for k, _ in samples], torch.stack([x for _, x in samples])


def wds_dataset(urls: Sequence[str], fmt: str, batch: int, seed: int = 0, handler: Any = None,
                partial: bool = False) -> Any:
    """WebDataset the way its documentation sets up multi-node training: shards split by node
    (RANK/WORLD_SIZE) and by loader worker, shuffled shards and samples, decoded in the workers."""
    import webdataset as wds

    ds = wds.WebDataset(list(urls), shardshuffle=len(urls), detshuffle=True, seed=seed,
                        nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker,
                        handler=handler or wds.reraise_exception, empty_check=False)
    ext = "npy" if fmt == "raw" else "png"
    return (ds.shuffle(1000, seed=seed).decode("torchrgb8", handler=handler or wds.reraise_exception)
            .to_tuple("__key__", ext).map_tuple(lambda k: k, _chw).batched(batch, collation_fn=_collate, partial=partial))


def wds_batches(urls: Sequence[str], fmt: str, workers: int, batch: int, seed: int = 0,
                handler: Any = None) -> Iterator[tuple[list[str], torch.Tensor]]:
    """One rank's (keys, float images) batches; endless over epochs."""
    loader = torch.utils.data.DataLoader(wds_dataset(urls, fmt, batch, seed, handler), batch_size=None,
                                         num_workers=workers, persistent_workers=workers > 0)
    while True:
        empty = True
        for keys, images in loader:
            empty = False
            yield keys, _u8_to_float(images)
        if empty:
            return


def wids_available() -> Optional[str]:
    """The installed wids version, or None."""
    from importlib import metadata

    try:
        return metadata.version("wids")
    except metadata.PackageNotFoundError:
        return None


def _wids_decode(fmt: str) -> Callable[[dict], tuple[str, torch.Tensor]]:
    """wids's own decoder (images to numpy HWC, .npy loaded), then uint8 CHW."""
    from wids.wids_decode import default_decoder

    ext = ".npy" if fmt == "raw" else ".png"

    def decode(sample: dict) -> tuple[str, torch.Tensor]:
        return sample["__key__"], _chw(default_decoder(sample, format="numpy")[ext])
    return decode


def wids_dataset(urls: Sequence[str], counts: Sequence[int], fmt: str, cache: Path) -> Any:
    import wids

    shards = [{"url": u, "nsamples": n} for u, n in zip(urls, counts)]
    # wids copies each shard into its cache under the shard's file name alone: one folder per
    # shard folder, or r64-000000.tar of the png shards would be read for the raw ones
    folder = cache / hashlib.sha1(str(Path(urls[0]).parent).encode()).hexdigest()[:12]
    return wids.ShardListDataset(shards, cache_dir=str(folder), transformations=[_wids_decode(fmt)])


def wids_sampler(ds: Any, rank: int, world_size: int, seed: int = 0, skip: int = 0) -> Any:
    """DistributedChunkedSampler's split (rank r reads [r * ceil(N/W), ...)) without a process
    group, shuffled within chunks of a shard; `skip` drops the first indices (a resume)."""
    import wids

    n = len(ds)
    chunk = (n + world_size - 1) // world_size
    sampler = wids.ChunkedSampler(ds, num_samples=(rank * chunk, min(rank * chunk + chunk, n)),
                                  chunksize=CMP_SHARD, seed=seed, shuffle=True, shufflefirst=True)
    if not skip:
        return sampler

    class Skipping(torch.utils.data.Sampler):
        def __iter__(self) -> Iterator[int]:
            it = iter(sampler)
            for _ in range(skip):
                next(it)
            yield from it

        def __len__(self) -> int:
            return len(sampler) - skip
    return Skipping()


def wids_batches(ds: Any, workers: int, batch: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 skip: int = 0, epochs: Optional[int] = None,
                 drop_last: bool = True) -> Iterator[tuple[list[str], torch.Tensor]]:
    sampler = wids_sampler(ds, rank, world_size, seed, skip)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers,
                                         collate_fn=_collate, drop_last=drop_last, persistent_workers=workers > 0)
    epoch = 0
    while epochs is None or epoch < epochs:
        for keys, images in loader:
            yield keys, _u8_to_float(images)
        epoch += 1


def ours_loader(shard_dir: Path, workers: int, batch: int, rank: int = 0, world_size: int = 1) -> Any:
    from gan_dist.config import DataConfig
    from gan_dist.data import build_loader, resolve_shards

    cfg = DataConfig(urls=str(shard_dir), num_workers=workers)
    shards = resolve_shards(cfg, need_counts=True, log=lambda m: None)
    return build_loader(shards, cfg, 3, CMP_RES, batch, 0, rank, world_size, torch.device("cpu"), log=lambda m: None)


class _Rank:
    """RANK/WORLD_SIZE for webdataset's split_by_node while its loader workers start."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.env = {"RANK": str(rank), "WORLD_SIZE": str(world_size)}

    def __enter__(self) -> None:
        self.saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)

    def __exit__(self, *exc: Any) -> None:
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def compare_speed(reader: str, fmt: str, path: Path, workers: int, batch: int, seconds: float,
                  cache: Path) -> float:
    if reader == "gan_dist":
        loader = ours_loader(path, workers, batch)
        try:
            return rate(loader, seconds)[0]
        finally:
            loader.close()
    urls, counts = _urls_counts(path)
    if reader == "webdataset":
        it = wds_batches(urls, fmt, workers, batch)
    else:
        it = wids_batches(wids_dataset(urls, counts, fmt, cache), workers, batch)
    try:
        return rate((x for _, x in it), seconds)[0]
    finally:
        it.close()


def _urls_counts(path: Path) -> tuple[list[str], list[int]]:
    from gan_dist.data.manifest import read_manifest

    m = read_manifest(path / "manifest.json")
    return m["urls"], m["counts"]


def property_epoch(path: Path, reader: str, batch: int, cache: Path) -> dict[str, Any]:
    """One epoch on 2 ranks x 2 workers: samples and batches each rank got, repeats, misses.
    The others keep partial batches here, so that what is missing is the split's doing."""
    urls, counts = _urls_counts(path)
    world, workers = 2, 2
    keys: list[list[str]] = []
    batches: list[int] = []
    for rank in range(world):
        got: list[list[str]] = []
        if reader == "gan_dist":
            loader = ours_loader(path, workers, batch, rank, world)
            for _ in range(loader.spec.batches_per_epoch * loader.spec.workers):
                b = loader.next_batch()
                got.append([k for k, pad in zip(b.keys, b.padded.tolist()) if not pad])
            loader.close()
        elif reader == "webdataset":
            with _Rank(rank, world):  # what split_by_node reads
                loader = torch.utils.data.DataLoader(wds_dataset(urls, "png", batch, partial=True),
                                                     batch_size=None, num_workers=workers)
                got = [k for k, _ in loader]
        else:
            ds = wids_dataset(urls, counts, "png", cache)
            got = [k for k, _ in wids_batches(ds, workers, batch, rank, world, epochs=1, drop_last=False)]
        keys.append([k for b in got for k in b])
        batches.append(len(got))
    every = [k for rank_keys in keys for k in rank_keys]
    total = sum(counts)
    missing = total - len(set(every))
    repeated = len(every) - len(set(every))
    per_rank = [len(k) for k in keys]
    return {"samples": total, "per_rank_samples": per_rank, "batches_per_rank": batches,
            "missing": missing, "repeated": repeated, "once": missing == 0 and repeated == 0,
            "equal_per_rank": len(set(per_rank)) == 1 and len(set(batches)) == 1}


def property_resume(path: Path, reader: str, batch: int, cache: Path, k: int = 5, m: int = 4) -> dict[str, Any]:
    """Interrupted after k batches, continued for m: bitwise the batches k..k+m of an unbroken run?
    gan_dist restores a saved position; the others are restarted with the same seed and skip
    what was consumed (wids: sampler indices, nothing read; webdataset: k batches read again)."""
    urls, counts = _urls_counts(path)
    workers = 2
    if reader == "gan_dist":
        a = ours_loader(path, workers, batch)
        ref = [a.next_batch().images for _ in range(k + m)]
        b = ours_loader(path, workers, batch)
        for _ in range(k):
            b.next_batch()
        state = b.state_dict()
        b.close()
        c = ours_loader(path, workers, batch)
        started = time.perf_counter()
        c.load_state_dict(state)
        got = [c.next_batch().images for _ in range(m)]
        first = time.perf_counter() - started
        a.close()
        c.close()
        how = "loader.state_dict() / load_state_dict() (checkpointed with the run)"
    elif reader == "webdataset":
        ref = [x for _, (_, x) in zip(range(k + m), wds_batches(urls, "png", workers, batch))]
        started = time.perf_counter()
        it = wds_batches(urls, "png", workers, batch)
        for _ in range(k):
            next(it)  # no position to restore: read and decode again, then continue
        got = [next(it)[1] for _ in range(m)]
        first = time.perf_counter() - started
        it.close()
        how = "none offered; restart with the same seed and read k batches again"
    else:
        ds = wids_dataset(urls, counts, "png", cache)
        ref = [x for _, (_, x) in zip(range(k + m), wids_batches(ds, workers, batch))]
        started = time.perf_counter()
        it = wids_batches(ds, workers, batch, skip=k * batch)
        got = [next(it)[1] for _ in range(m)]
        first = time.perf_counter() - started
        it.close()
        how = "none offered; a sampler that skips the first k * batch indices (user code)"
    equal = all(torch.equal(x, y) for x, y in zip(ref[k:], got)) and len(got) == m
    return {"bitwise": equal, "how": how, "seconds_to_continue": round(first, 2)}


def _damaged_copy(path: Path, out: Path) -> tuple[Path, int]:
    """The png shards with one corrupt image (cut in half) and the last shard cut short;
    returns (folder, samples lost by the damage as our tar reader sees it)."""
    from gan_dist.data.index import count_shard

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(path, out)  # with the manifest: its sizes and counts no longer match
    urls, _ = _urls_counts(path)
    first = out / Path(urls[0]).name
    _cut_member(first, index=3)
    last = out / Path(urls[-1]).name
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    n, _ = count_shard(str(last))
    return out, _count_of(path, urls[-1]) - n


def _count_of(path: Path, url: str) -> int:
    urls, counts = _urls_counts(path)
    return counts[urls.index(url)]


def _cut_member(shard: Path, index: int) -> None:
    """Rewrite `shard` with the image of sample `index` cut to half its bytes (still a valid tar)."""
    import io
    import tarfile

    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    images = [i for i, (m, _) in enumerate(members) if m.name.endswith(".png")]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, (m, data) in enumerate(members):
            if i == images[index]:
                data = data[: len(data) // 2]
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


def property_damage(path: Path, reader: str, batch: int, cache: Path, work: Path) -> dict[str, Any]:
    """One epoch over shards with a corrupt image and a truncated shard: does the run go on with
    the default settings, and does the reader say how many samples it lost, and where?"""
    from gan_dist.data.index import count_shard

    damaged, lost = _damaged_copy(path, work / "damaged-png-64")
    urls = sorted(str(p) for p in damaged.glob("*.tar"))
    out: dict[str, Any] = {"cut_off": lost}
    if reader == "gan_dist":
        from gan_dist.config import DataConfig
        from gan_dist.data import build_loader, resolve_shards

        cfg = DataConfig(urls=str(damaged), num_workers=1)
        warned: list[str] = []
        loader = build_loader(resolve_shards(cfg, need_counts=True, log=warned.append), cfg, 3, CMP_RES, batch, 0, 0,
                              1, torch.device("cpu"), log=lambda m: None)
        for _ in range(loader.spec.batches_per_epoch):
            loader.next_batch()
        st = loader.stats()
        loader.close()
        out.update(goes_on=True, counted=st["skipped"], by_reason=st["by_reason"],
                   warnings=[w for w in warned if "warning" in w])
        return out
    try:
        if reader == "webdataset":
            n = sum(len(k) for k, _ in _one_epoch(wds_dataset(urls, "png", batch, partial=True)))
        else:
            counts = [count_shard(u)[0] for u in urls]
            n = sum(len(k) for k, _ in wids_batches(wids_dataset(urls, counts, "png", cache), 1, batch, epochs=1,
                                                    drop_last=False))
        out.update(goes_on=True, delivered=n)
    except Exception as exc:  # noqa: BLE001 - what the default settings do is the finding
        text = (str(exc).splitlines() or [""])[0][:100]
        out.update(goes_on=False, default_error=f"{type(exc).__name__}{': ' + text if text else ''}")
    if reader == "webdataset":
        seen: list[str] = []

        def skip(exc: Exception) -> bool:  # wds.warn_and_continue, counting what it skips
            seen.append(type(exc).__name__)
            return True
        n = sum(len(k) for k, _ in _one_epoch(wds_dataset(urls, "png", batch, handler=skip, partial=True)))
        out["with_handler"] = (f"with handler=warn_and_continue it goes on ({n} delivered) and counts nothing; a "
                               f"handler of one's own sees {len(seen)} exceptions ({', '.join(sorted(set(seen)))}), "
                               "without the shard")
    else:
        out["with_handler"] = "no handler option (a dataset wrapper of one's own)"
    return out


def _one_epoch(ds: Any) -> Iterator[Any]:
    yield from torch.utils.data.DataLoader(ds, batch_size=None, num_workers=0)


def property_code(path: Path, reader: str, work: Path, cache: Path) -> dict[str, Any]:
    """A shard from elsewhere whose first sample has one more member, `.pkl`: a pickle that
    creates a file when loaded. Does reading the images run it?"""
    import pickle

    marker = work / f"pickle-ran-{reader}"
    marker.unlink(missing_ok=True)
    folder = work / f"pickled-{reader}"
    folder.mkdir(exist_ok=True)
    urls, counts = _urls_counts(path)
    shard = folder / "other-000000.tar"
    shutil.copyfile(urls[0], shard)

    class Payload:
        def __reduce__(self) -> tuple:
            return (open, (str(marker), "w"))

    _insert_member(shard, "pkl", pickle.dumps(Payload()))
    if reader == "gan_dist":
        from gan_dist.config import DataConfig
        from gan_dist.data import build_loader, resolve_shards

        cfg = DataConfig(urls=str(shard), num_workers=0)
        loader = build_loader(resolve_shards(cfg, need_counts=True, log=lambda m: None), cfg, 3, CMP_RES, 8, 0, 0, 1,
                              torch.device("cpu"), log=lambda m: None)
        for _ in range(loader.spec.batches_per_epoch):  # the whole shard
            loader.next_batch()
        loader.close()
    elif reader == "webdataset":
        for _ in _one_epoch(wds_dataset([str(shard)], "png", 8, partial=True)):
            pass
    else:
        for _ in wids_batches(wids_dataset([str(shard)], counts[:1], "png", cache), 0, 8, epochs=1, drop_last=False):
            pass
    ran = marker.exists()
    marker.unlink(missing_ok=True)
    return {"runs_code": ran}


def _insert_member(shard: Path, ext: str, data: bytes) -> None:
    """Add `{key}.{ext}` to the first sample of `shard`, right after its members."""
    import io
    import tarfile

    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    key = members[0][0].name.split(".")[0]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        added = False
        for i, (m, blob) in enumerate(members):
            tar.addfile(m, io.BytesIO(blob))
            following = members[i + 1][0].name.split(".")[0] if i + 1 < len(members) else None
            if not added and following != key:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                added = True


def compare_main(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="data-vs-wds-"))
    cache = work / "wids-cache"
    have_wids = wids_available()
    readers = ["gan_dist", "webdataset"] + (["wids"] if have_wids else [])
    result: dict[str, Any] = {"env": environment(), "args": vars(args), "wids": have_wids, "rows": [],
                              "properties": {}}
    result["env"]["versions"]["wids"] = have_wids
    src = make_sources(work, args.images)
    cores = os.cpu_count() or 1
    paths = {fmt: shards_copy(src, work / f"cmp-{fmt}-{CMP_RES}", CMP_RES, fmt, cores, max_count=CMP_SHARD)
             for fmt in args.formats}
    settings = [(r, f, w) for f in args.formats for w in args.workers for r in readers]
    runs: dict[tuple, list[float]] = {s: [] for s in settings}
    for round_ in range(args.repeats):
        for st in settings:
            value = compare_speed(st[0], st[1], paths[st[1]], st[2], args.batch_size, args.seconds, cache)
            runs[st].append(round(value, 1))
            print(f"round {round_ + 1}: {st[0]:10s} {st[1]:4s} {st[2]} worker(s): {value:9.1f} img/s", file=sys.stderr)
    for (reader, fmt, w), values in runs.items():
        result["rows"].append({"reader": reader, "format": fmt, "resolution": CMP_RES, "workers": w,
                               "batch_size": args.batch_size, "img_per_sec": max(values),
                               "median": float(np.median(values)), "runs": values})
    png = paths.get("png") or shards_copy(src, work / f"cmp-png-{CMP_RES}", CMP_RES, "png", cores,
                                           max_count=CMP_SHARD)
    for reader in readers:
        props = {"epoch": property_epoch(png, reader, args.batch_size, cache),
                 "resume": property_resume(png, reader, args.batch_size, cache),
                 "damage": property_damage(png, reader, args.batch_size, cache, work),
                 "pickle": property_code(png, reader, work, cache)}
        result["properties"][reader] = props
        print(f"properties {reader}: {json.dumps(props)}", file=sys.stderr)
    result["env"]["loadavg_end"] = list(os.getloadavg())
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    text = compare_markdown(result)
    Path(args.md).write_text(text)
    print(text)
    return result


def compare_markdown(result: dict[str, Any]) -> str:
    rows, env, a, props = result["rows"], result["env"], result["args"], result["properties"]
    readers = list(props)
    workers = sorted({r["workers"] for r in rows})
    label = {"gan_dist": "gan_dist reader", "webdataset": "webdataset.WebDataset",
             "wids": f"wids.ShardListDataset ({result['wids']})"}
    lines = [
        "# gan_dist's shard reader against webdataset's",
        "",
        f"The same {a['images']} images as {CMP_RES} px shards of {CMP_SHARD} samples, read into float batches "
        f"of {a['batch_size']} in [-1, 1] in the measuring process, on {env['machine']} with {env['cpus']} CPUs "
        f"({env['date']}; webdataset {env['versions']['webdataset']}, wids {result['wids'] or 'not installed'}, "
        f"torch {env['versions']['torch']}). Images/s: best (median) of {a['repeats']} rounds of {a['seconds']} s "
        f"runs, rounds over all settings; load average {env['loadavg_start'][0]:.1f} at the start, "
        f"{env['loadavg_end'][0]:.1f} at the end (a shared machine: compare within the table). webdataset: "
        "`WebDataset(urls, shardshuffle, nodesplitter=split_by_node, workersplitter=split_by_worker)"
        ".shuffle(1000).decode(\"torchrgb8\").to_tuple(...).batched(B)` in a DataLoader; wids: "
        "`ShardListDataset` with its decoders and a `ChunkedSampler` split as `DistributedChunkedSampler` "
        "splits. webdataset 1.0.2 ships no wids: it is the separate `wids` package. Produced by:",
        "",
        "    python benchmarks/data_throughput.py --vs-webdataset --images 3000 --formats png raw --workers 1 2",
        "",
        "| format | reader | " + " | ".join(f"{w} worker{'s' if w > 1 else ''}" for w in workers) + " |",
        "|---|---|" + "---:|" * len(workers),
    ]
    for fmt in ("png", "raw"):
        for reader in readers:
            cells = []
            for w in workers:
                r = next((r for r in rows if (r["reader"], r["format"], r["workers"]) == (reader, fmt, w)), None)
                cells.append(f"{r['img_per_sec']:,.0f} ({r['median']:,.0f})" if r else "-")
            if any(c != "-" for c in cells):
                lines.append(f"| {fmt} | {label[reader]} | " + " | ".join(cells) + " |")
    lines += ["", "Properties (png shards; 2 ranks x 2 workers simulated in one process):", "",
              "| property | " + " | ".join(label[r] for r in readers) + " |",
              "|---|" + "---|" * len(readers)]

    def epoch_cell(p: dict[str, Any]) -> str:
        e = p["epoch"]
        return (f"once: {'yes' if e['once'] else 'no'} ({e['missing']} missing, {e['repeated']} repeated); "
                f"equal on every rank: {'yes' if e['equal_per_rank'] else 'no'} (samples {e['per_rank_samples']}, "
                f"batches {e['batches_per_rank']})")

    def resume_cell(p: dict[str, Any]) -> str:
        r = p["resume"]
        return f"{'yes' if r['bitwise'] else 'no'} ({r['how']}; {r['seconds_to_continue']} s to the next batches)"

    def damage_cell(p: dict[str, Any]) -> str:
        d = p["damage"]
        if "counted" in d:
            return (f"goes on; counts by reason and shard ({', '.join(f'{k} {v}' for k, v in d['by_reason'].items())}); "
                    f"at the start {len(d['warnings'])} warnings name the cut shard, that it no longer matches "
                    "its manifest and how many of its samples are used")
        first = f"goes on ({d['delivered']} delivered), counts nothing" if d["goes_on"] else (
            f"stops: {d['default_error']}")
        return f"default: {first}; {d['with_handler']}"

    def code_cell(p: dict[str, Any]) -> str:
        return "yes: a .pkl member was unpickled" if p["pickle"]["runs_code"] else "no"

    for name, fn in (("one epoch on uneven shards: each sample once; the same samples and batches on every "
                      "rank (DDP needs equal batch counts)", epoch_cell),
                     ("bitwise resume from a position", resume_cell),
                     ("a corrupt image and a shard cut short (half its samples): the run goes on and says "
                      "what it lost", damage_cell),
                     ("reading images from a shard from elsewhere runs code", code_cell)):
        lines.append(f"| {name} | " + " | ".join(fn(props[r]) for r in readers) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
