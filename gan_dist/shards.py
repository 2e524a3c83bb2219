"""Write a folder of images (or the built-in digits) as WebDataset tar shards with a manifest.

    python -m gan_dist.shards --src ~/images --out /data/faces --resolution 64 --format png
    python -m gan_dist.shards --src ~/images --out /data/faces-raw --resolution 64 --format raw --workers 16
    python -m gan_dist.shards --demo --out /data/digits --format raw
    python -m gan_dist.shards --verify /data/faces          # check sizes and SHA-256 against the manifest

Train on the result with `data.urls=/data/faces` (the directory: its manifest gives the
shard list and sample counts). Sub-folders of --src are the classes (as torchvision's
ImageFolder sees them); unreadable images are skipped, listed on stderr and counted in the
manifest.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Optional

from gan_dist.data.manifest import MANIFEST, DataError

EXIT_USAGE = 2


def parse_size(text: str) -> int:
    """'512M', '1G', '3e9', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 512M, 1G, 3e9)")
    value = float(m.group(1)) * 1024 ** "_KMGT".index(m.group(2).upper() or "_")
    if value < 1024:
        raise argparse.ArgumentTypeError(f"--max-size {text!r} is too small (at least 1K)")
    return int(value)


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gan_dist.shards", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--src", help="folder tree of images (jpg, png, webp, bmp, gif, tif)")
    src.add_argument("--demo", action="store_true", help="the built-in handwritten digits (1797 images)")
    src.add_argument("--verify", metavar="DIR_OR_MANIFEST", help="check shards against their manifest and exit")
    p.add_argument("--out", help="output directory (created)")
    p.add_argument("--name", help="shard name prefix: NAME-000000.tar (default: the source folder's name)")
    p.add_argument("--resolution", type=positive, help="centre-crop and resize to R x R (default: keep)")
    p.add_argument("--channels", type=int, choices=(1, 3), help="1: grayscale, 3: RGB (default 3; demo: 1)")
    p.add_argument("--format", default="png", choices=("png", "jpg", "raw"),
                   help="png: lossless; jpg: small; raw: uint8 arrays, no decode when reading (default png)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    p.add_argument("--max-count", type=positive, help="samples per shard at most (default 10000; --demo: 16 shards)")
    p.add_argument("--max-size", type=parse_size, default=parse_size("1G"), help="bytes per shard at most (default 1G)")
    p.add_argument("--workers", type=positive, default=max(1, os.cpu_count() or 1),
                   help="processes that decode and encode (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample order (default 0)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the sorted path order")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.verify:
        from gan_dist.data.writer import verify

        problems = verify(args.verify)
        for problem in problems:
            print(f"gan_dist.shards: {problem}", file=sys.stderr)
        if not problems:
            print(f"{args.verify}: all shards match the manifest")
        return 1 if problems else 0
    if not args.out:
        print("gan_dist.shards: error: --out is required", file=sys.stderr)
        return EXIT_USAGE
    out = Path(args.out)
    if out.exists() and not args.overwrite and ((out / MANIFEST).exists() or any(out.glob("*.tar"))):
        print(f"gan_dist.shards: error: {str(out)!r} already holds shards; pass --overwrite to replace them",
              file=sys.stderr)
        return EXIT_USAGE
    if out.exists() and args.overwrite:
        for old in list(out.glob("*.tar")) + [out / MANIFEST]:
            old.unlink(missing_ok=True)
    from gan_dist.data.writer import WriteOptions, write_folder

    try:
        if args.demo:
            from gan_dist.data.demo import write_demo

            if args.channels == 3:
                raise DataError("--demo images are grayscale: use --channels 1 (a 3-channel model reads them as RGB)")
            write_demo(out, fmt=args.format, resolution=args.resolution, workers=args.workers,
                       progress=not args.no_progress, max_count=args.max_count)
        else:
            opt = WriteOptions(resolution=args.resolution, channels=args.channels or 3, fmt=args.format,
                               quality=args.quality)
            write_folder(args.src, out, args.name, opt, args.max_count or 10_000, args.max_size, args.workers,
                         seed=None if args.no_shuffle else args.seed, progress=not args.no_progress)
    except DataError as exc:
        print(f"gan_dist.shards: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
