"""Train the digits classifier behind the offline demo metrics (digits FD, class coverage).

Deterministic on the CPU (fixed seed, fixed thread count). Trains on the stratified
train split of scikit-learn's bundled digits with light augmentation (shifts, scales,
small rotations, blur, noise) so that its features stay meaningful on imperfect
generator samples, reports accuracy on the held-out split, and writes

    gan_dist/assets/digits_classifier.pt    float16 state_dict (torch.load weights_only)
    gan_dist/assets/digits_classifier.json  architecture, split, accuracy, FD calibration

The calibration block records digits FD / KID of real held-out digits, noise, and
degraded real digits against the train split: the scale on which a generator's digits FD
is read.

    python scripts/train_digits_classifier.py            # about 3 min on 1 CPU thread
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gan_dist.metrics.digits import (
    META_PATH,
    SPLIT_SEED,
    TEST_FRACTION,
    WEIGHTS_PATH,
    DigitsClassifier,
    class_coverage,
    digits_features,
    load_digits_extractor,
    load_digits_split,
)
from gan_dist.metrics.frechet import feature_stats, frechet_distance, kernel_inception_distance


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random affine (shift +-3 px, scale 0.85-1.15, rotation +-12 deg), blur, noise, contrast."""
    n = x.shape[0]

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, *shape, generator=gen)

    scale = u(0.85, 1.15)
    angle = u(-12.0, 12.0) * math.pi / 180.0
    shift = u(-3.0, 3.0, 2) / 16.0  # pixels -> normalised coordinates of a 32 px image
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Sample x + 1 with zero padding so pixels moved in from outside are background (-1).
    out = F.grid_sample(x + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0

    # Blur half of the batch with a random-width Gaussian (GAN samples are often soft).
    sigma = u(0.3, 1.5)
    blur_mask = torch.rand(n, generator=gen) < 0.5
    if blur_mask.any():
        out[blur_mask] = gaussian_blur(out[blur_mask], sigma[blur_mask])

    contrast = u(0.7, 1.1, 1, 1, 1)
    out = (out + 1.0) * contrast - 1.0
    noise_std = u(0.0, 0.2, 1, 1, 1)
    out = out + noise_std * torch.randn(out.shape, generator=gen)
    return out.clamp(-1.0, 1.0)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma (pixels), background-padded."""
    n = x.shape[0]
    sigma_t = torch.as_tensor(sigma, dtype=x.dtype).expand(n).reshape(n, 1)
    radius = 4
    k = torch.arange(-radius, radius + 1, dtype=x.dtype)
    w = torch.exp(-0.5 * (k / sigma_t) ** 2)
    w = w / w.sum(1, keepdim=True)  # n x K
    xp = F.pad(x + 1.0, (radius, radius, radius, radius))  # zero pad == background after shift
    # Per-image kernels through grouped convolution: images as channels.
    h = xp.transpose(0, 1)  # 1 x n x H x W
    h = F.conv2d(h, w.view(n, 1, 1, -1), groups=n)
    h = F.conv2d(h, w.view(n, 1, -1, 1), groups=n)
    return h.transpose(0, 1) - 1.0


def shift_images(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Translate by whole pixels, filling with background."""
    out = torch.full_like(x, -1.0)
    h, w = x.shape[2:]
    out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = x[
        ..., max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


@torch.no_grad()
def accuracy(model: DigitsClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model.logits(x).argmax(1) == y).float().mean())


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(args.seed)

    x_tr, y_tr, x_te, y_te = load_digits_split(TEST_FRACTION, SPLIT_SEED)
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(x_tr) / args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.2
    )
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_tr), generator=gen)
        total, correct, loss_sum = 0, 0, 0.0
        for i in range(0, len(x_tr), args.batch_size):
            idx = perm[i : i + args.batch_size]
            xb, yb = x_tr[idx], y_tr[idx]
            keep = torch.rand(len(idx), generator=gen) < args.clean_fraction
            xa = augment(xb, gen)
            xa[keep] = xb[keep]
            logits = model.logits(xa)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            total += len(idx)
        if (epoch + 1) % 5 == 0 or epoch == args.epochs - 1:
            print(
                f"epoch {epoch + 1:3d}  loss {loss_sum / total:.4f}  train-aug acc {correct / total:.4f}  "
                f"test acc {accuracy(model, x_te, y_te):.4f}  ({time.time() - t0:.0f} s)",
                flush=True,
            )
    train_seconds = time.time() - t0

    weights_path = args.out_dir / WEIGHTS_PATH.name
    meta_path = args.out_dir / META_PATH.name
    args.out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    torch.save(state, weights_path)
    meta = {
        "arch": model.arch,
        "feature_layer": "features(): ReLU(Linear) after global average pooling",
        "weights_dtype": "float16",
        "input": "N x 1 x 32 x 32 in [-1, 1], gan_dist.metrics.digits.digits_to_tensor_32 of 8x8 digits",
        "split": {"test_fraction": TEST_FRACTION, "seed": SPLIT_SEED, "n_train": len(x_tr), "n_test": len(x_te)},
        "training": {
            "seed": args.seed,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "clean_fraction": args.clean_fraction,
            "threads": args.threads,
            "torch": torch.__version__,
            "seconds": round(train_seconds, 1),
        },
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
    }
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")

    # Everything below is measured with the written (float16-rounded) weights.
    ext = load_digits_extractor("cpu", weights=weights_path, meta=meta_path)
    test_acc = accuracy(ext, x_te, y_te)
    meta["test_accuracy"] = round(test_acc, 4)
    meta["train_accuracy"] = round(accuracy(ext, x_tr, y_tr), 4)
    meta["weights_bytes"] = weights_path.stat().st_size
    meta["calibration"] = calibrate(ext, x_tr, x_te, y_te, args.seed)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps({k: meta[k] for k in ("test_accuracy", "train_accuracy", "weights_bytes")}))
    print(json.dumps(meta["calibration"], indent=2))


def calibrate(
    ext: DigitsClassifier, x_tr: torch.Tensor, x_te: torch.Tensor, y_te: torch.Tensor, seed: int
) -> dict:
    """Digits FD / KID of reference cases against the train split, all with N = n_test fakes."""
    gen = torch.Generator().manual_seed(seed + 1)
    n = len(x_te)
    ref_feats = digits_features(x_tr, ext)
    ref_stats = feature_stats(ref_feats)
    cases = {
        "real_test": x_te,
        "gaussian_noise": torch.randn(x_te.shape, generator=gen).clamp(-1, 1),
        "uniform_noise": torch.rand(x_te.shape, generator=gen) * 2 - 1,
        "test_blur_sigma1": gaussian_blur(x_te, 1.0),
        "test_blur_sigma2": gaussian_blur(x_te, 2.0),
        "test_shift_4px": shift_images(x_te, 4, 4),
        "test_blur1_shift4": shift_images(gaussian_blur(x_te, 1.0), 4, 4),
        "test_noise_0.3": (x_te + 0.3 * torch.randn(x_te.shape, generator=gen)).clamp(-1, 1),
        "test_classes_0_to_4_only": x_te[y_te < 5],
        "test_class_0_only": x_te[y_te == 0],
    }
    out: dict = {
        "reference": f"real train split ({len(x_tr)} images)",
        "n_fake": n,
        "note": "FD is biased upward for small N; compare generator values at the same N.",
        "cases": {},
    }
    for name, imgs in cases.items():
        feats = digits_features(imgs, ext)
        fd = frechet_distance(*feature_stats(feats), *ref_stats)
        kid_mean, kid_std = kernel_inception_distance(feats, ref_feats, num_subsets=50, subset_size=len(imgs), seed=seed)
        cov = class_coverage(imgs, 0.9, ext)
        out["cases"][name] = {
            "n": len(imgs),
            "digits_fd": round(fd, 4),
            "kid": round(kid_mean, 6),
            "kid_std": round(kid_std, 6),
            "class_coverage": cov.covered,
            "confident_fraction": round(cov.confident_fraction, 4),
        }
        print(f"{name:26s} n={len(imgs):4d}  FD {fd:10.4f}  KID {kid_mean:9.5f}  coverage {cov.covered}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--clean-fraction", type=float, default=0.2, help="share of each batch left unaugmented")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (fixed for reproducibility)")
    p.add_argument("--out-dir", type=Path, default=WEIGHTS_PATH.parent, help="where the .pt and .json go")
    train(p.parse_args())


if __name__ == "__main__":
    main()
