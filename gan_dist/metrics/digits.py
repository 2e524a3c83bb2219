"""Offline metrics for the built-in digits demo: a small classifier's feature space.

InceptionV3 needs weights that cannot be downloaded here and knows nothing about 8x8
handwriting upscaled to 32x32. A classifier trained on the bundled digits
(scripts/train_digits_classifier.py; weights committed under gan_dist/assets/) gives a
feature space for the Frechet distance ("digits FD") and a confident label per sample
for class coverage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gan_dist.metrics.frechet import feature_stats, frechet_distance

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets"
WEIGHTS_PATH = ASSET_DIR / "digits_classifier.pt"
META_PATH = ASSET_DIR / "digits_classifier.json"

NUM_CLASSES = 10
IMAGE_SIZE = 32
# Held-out split of the bundled digits: the classifier never sees these images, so its
# reported accuracy and the train-vs-test FD are honest.
SPLIT_SEED = 0
TEST_FRACTION = 0.2

Stats = tuple[np.ndarray, np.ndarray]


def digits_to_tensor_32(images_8x8: np.ndarray) -> torch.Tensor:
    """The one canonical conversion of raw 8x8 digits (0..16) to N x 1 x 32 x 32 in [-1, 1].

    Bilinear upsampling (align_corners=False) of values already in [-1, 1] stays in
    [-1, 1]; training data, the classifier and the metrics all go through this function so
    that real images look the same everywhere.
    """
    arr = np.asarray(images_8x8)
    if arr.ndim == 2 and arr.shape[1] == 64:
        arr = arr.reshape(-1, 8, 8)
    if arr.ndim != 3 or arr.shape[1:] != (8, 8):
        raise ValueError(f"expected digits of shape (N, 8, 8) or (N, 64), got {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() > 16):
        raise ValueError(
            f"digit pixel values must lie in 0..16 (sklearn load_digits), got {arr.min()}..{arr.max()}"
        )
    x = torch.from_numpy(arr.astype(np.float32)).unsqueeze(1) / 8.0 - 1.0
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return x.clamp_(-1.0, 1.0)


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Raw bundled digits (1797 x 8 x 8, values 0..16) and their labels; no download."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return np.asarray(bunch.images), np.asarray(bunch.target, dtype=np.int64)


def digits_split(
    labels: np.ndarray, test_fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/test indices: the same fraction of every class goes to test."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(test_fraction * idx.size))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_digits_split(
    test_fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): 32x32 images in [-1, 1] and int64 labels."""
    images, labels = load_digits_arrays()
    tr, te = digits_split(labels, test_fraction, seed)
    x = digits_to_tensor_32(images)
    y = torch.from_numpy(labels)
    return x[tr], y[tr], x[te], y[te]


def _conv_block(c_in: int, c_out: int, n_convs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(n_convs):
        layers += [
            nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        ]
    layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class DigitsClassifier(nn.Module):
    """Three conv stages (32 -> 16 -> 8 -> 4), global average pool, a feature layer, logits."""

    def __init__(
        self,
        widths: Sequence[int] = (32, 64, 128),
        convs_per_stage: Sequence[int] = (2, 1, 1),
        feature_dim: int = 128,
        dropout: float = 0.2,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        if len(widths) != len(convs_per_stage):
            raise ValueError("widths and convs_per_stage must have the same length")
        self.arch = {
            "widths": list(widths),
            "convs_per_stage": list(convs_per_stage),
            "feature_dim": feature_dim,
            "dropout": dropout,
            "num_classes": num_classes,
        }
        stages, c_in = [], 1
        for w, n in zip(widths, convs_per_stage):
            stages.append(_conv_block(c_in, w, n))
            c_in = w
        self.body = nn.Sequential(*stages)
        self.feature = nn.Sequential(nn.Linear(c_in, feature_dim), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    @staticmethod
    def _check_input(x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[2:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(
                f"the digits classifier takes N x 1 x {IMAGE_SIZE} x {IMAGE_SIZE} images in [-1, 1], "
                f"got shape {tuple(x.shape)}"
            )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (N x feature_dim): the space digits FD is measured in."""
        self._check_input(x)
        h = self.body(x.float())
        return self.feature(h.mean(dim=(2, 3)))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x)


def read_extractor_meta(path: Path = META_PATH) -> dict[str, Any]:
    """The JSON written next to the weights: architecture, split, accuracy, calibration."""
    if not path.is_file():
        raise FileNotFoundError(
            f"digits classifier metadata {path} is missing; it is part of the package "
            "(regenerate it with `python scripts/train_digits_classifier.py`)"
        )
    return json.loads(path.read_text())


def load_digits_extractor(
    device: Union[str, torch.device] = "cpu",
    weights: Path = WEIGHTS_PATH,
    meta: Path = META_PATH,
) -> DigitsClassifier:
    """The committed digits classifier in eval mode, frozen, on `device` (float32)."""
    if not Path(weights).is_file():
        raise FileNotFoundError(
            f"digits classifier weights {weights} are missing; they ship with the package "
            "(regenerate them with `python scripts/train_digits_classifier.py`)"
        )
    model = DigitsClassifier(**read_extractor_meta(Path(meta))["arch"])
    state = torch.load(weights, map_location="cpu", weights_only=True)
    # Stored in float16 to stay small; load_state_dict copies into the float32 parameters.
    model.load_state_dict(state)
    model.eval().requires_grad_(False)
    return model.to(device)


@torch.no_grad()
def _batched(fn: Any, images: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    outs = [fn(images[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def digits_features(
    images: torch.Tensor, extractor: DigitsClassifier | None = None, batch_size: int = 512
) -> torch.Tensor:
    """Features of N x 1 x 32 x 32 images, computed in batches (float32, CPU)."""
    model = extractor if extractor is not None else load_digits_extractor()
    return _batched(model.features, images, batch_size, _device_of(model))


def digits_stats(
    images: torch.Tensor, extractor: DigitsClassifier | None = None, batch_size: int = 512
) -> Stats:
    """(mu, sigma) of the classifier features: what a reference set is reduced to."""
    return feature_stats(digits_features(images, extractor, batch_size))


def digits_fd(
    fake_images: torch.Tensor,
    real_images_or_stats: Union[torch.Tensor, Stats],
    extractor: DigitsClassifier | None = None,
    batch_size: int = 512,
) -> float:
    """Frechet distance in the digits classifier's feature space.

    The reference may be images or precomputed (mu, sigma), so a training run can compute
    the real statistics once. FD is biased upward for small N: compare values computed
    with the same number of fake samples.
    """
    model = extractor if extractor is not None else load_digits_extractor()
    if isinstance(real_images_or_stats, torch.Tensor):
        mu_r, sigma_r = digits_stats(real_images_or_stats, model, batch_size)
    else:
        mu_r, sigma_r = real_images_or_stats
    mu_f, sigma_f = digits_stats(fake_images, model, batch_size)
    return frechet_distance(mu_f, sigma_f, mu_r, sigma_r)


class ClassCoverage(NamedTuple):
    covered: int  # classes with at least one confident prediction
    counts: np.ndarray  # confident predictions per class (length 10)
    confident_fraction: float  # share of samples predicted with confidence >= threshold


def class_coverage(
    fake_images: torch.Tensor,
    threshold: float = 0.9,
    extractor: DigitsClassifier | None = None,
    batch_size: int = 512,
) -> ClassCoverage:
    """How many of the 10 digits a generator produces recognisably (mode-collapse check)."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a probability in [0, 1], got {threshold}")
    model = extractor if extractor is not None else load_digits_extractor()
    probs = _batched(model.logits, fake_images, batch_size, _device_of(model)).softmax(dim=1)
    return coverage_from_probs(probs, threshold)


def coverage_from_probs(probs: torch.Tensor, threshold: float = 0.9) -> ClassCoverage:
    """Class coverage from N x 10 class probabilities (e.g. gathered from several ranks)."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a probability in [0, 1], got {threshold}")
    conf, pred = probs.float().cpu().max(dim=1)
    confident = conf >= threshold
    counts = np.bincount(pred[confident].numpy(), minlength=probs.shape[1])
    n = max(len(probs), 1)
    return ClassCoverage(int((counts > 0).sum()), counts, float(confident.sum().item()) / n)
