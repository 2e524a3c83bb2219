"""Feature extractors for FID/KID: the offline digits classifier and InceptionV3.

An extractor maps images in [-1, 1] (N x C x H x W) to features (N x D) and, when it is a
classifier whose classes mean something for the data, class probabilities (for class
coverage). `identity` names the network and its weights, so that cached reference statistics
are never reused with another network.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from gan_dist.config import ConfigError

INCEPTION_ENV = "GAN_DIST_INCEPTION_WEIGHTS"
INCEPTION_FILE = "inception_v3_google-0cc3c7bd.pth"  # torchvision's IMAGENET1K_V1 weights
INCEPTION_URL = f"https://download.pytorch.org/models/{INCEPTION_FILE}"
INCEPTION_SIZE = 299


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


class Extractor:
    """Images in [-1, 1] -> (features, class probabilities or None)."""

    name: str = ""
    fd_key: str = "fd"  # the metric's name in logs: "digits_fd", "fid"
    feature_dim: int = 0
    identity: str = ""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = device

    def check_images(self, channels: int, resolution: int) -> None:
        """Raise ConfigError when images of this shape cannot be embedded."""

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        raise NotImplementedError


class DigitsExtractor(Extractor):
    """The committed digits classifier (gan_dist/assets/): 128-d features and 10 digit classes."""

    name = "digits"
    fd_key = "digits_fd"

    def __init__(self, device: torch.device) -> None:
        from gan_dist.metrics.digits import WEIGHTS_PATH, load_digits_extractor

        model = load_digits_extractor("cpu")
        super().__init__(model, device)
        self.feature_dim = model.arch["feature_dim"]
        self.identity = f"digits-{file_sha256(WEIGHTS_PATH)[:16]}"

    def check_images(self, channels: int, resolution: int) -> None:
        from gan_dist.metrics.digits import IMAGE_SIZE

        if channels != 1 or resolution != IMAGE_SIZE:
            raise ConfigError(
                f"eval.extractor=digits measures 1 x {IMAGE_SIZE} x {IMAGE_SIZE} handwritten digits, but the model "
                f"makes {channels} x {resolution} x {resolution} images: use eval.extractor=inception "
                "(or eval.enabled=false)")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        feats = self.model.features(images.to(self.device, torch.float32))
        probs = self.model.head(feats).softmax(dim=1)
        return feats.float(), probs.float()


def find_inception_weights(configured: Optional[str]) -> Optional[Path]:
    """eval.inception_weights, else $GAN_DIST_INCEPTION_WEIGHTS, else torchvision's download cache."""
    for source, value in (("eval.inception_weights", configured), (INCEPTION_ENV, os.environ.get(INCEPTION_ENV))):
        if value:
            path = Path(value).expanduser()
            if not path.is_file():
                raise ConfigError(f"{source}={value!r}: no such file (the InceptionV3 weights, "
                                  f"{INCEPTION_FILE} from {INCEPTION_URL})")
            return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    return cached if cached.is_file() else None


def missing_inception_message() -> str:
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    return (
        "eval.extractor=inception needs the InceptionV3 weights, and none were found. Download "
        f"{INCEPTION_URL} on a machine with network access and either set eval.inception_weights=/path/to/"
        f"{INCEPTION_FILE} or the environment variable {INCEPTION_ENV}, or put the file at {cached}; "
        "where downloading is allowed, eval.inception_download=true fetches it. Offline, the digits demo "
        "can use eval.extractor=digits, and eval.enabled=false turns evaluation off.")


def build_inception_v3(state: Optional[dict[str, torch.Tensor]] = None) -> nn.Module:
    """torchvision's InceptionV3 returning the 2048-d pool features (the FID layer)."""
    from torchvision.models import inception_v3

    model = inception_v3(weights=None, aux_logits=True, init_weights=state is None, transform_input=False)
    if state is not None:
        model.load_state_dict(state)
    model.fc = nn.Identity()
    model.AuxLogits = None
    model.aux_logits = False
    return model


class InceptionExtractor(Extractor):
    """InceptionV3's 2048-d pool features; images resized to 299 x 299, gray repeated to RGB.

    torchvision's weights expect ImageNet-normalised input that `transform_input` maps back to
    [-1, 1]; feeding [-1, 1] images with `transform_input=False` is the same computation.
    """

    name = "inception"
    fd_key = "fid"
    feature_dim = 2048

    def __init__(self, device: torch.device, weights: Optional[str] = None, download: bool = False) -> None:
        path = find_inception_weights(weights)
        if path is None and download:
            from torchvision.models import Inception_V3_Weights

            Inception_V3_Weights.IMAGENET1K_V1.get_state_dict(progress=False)  # into torch.hub's cache
            path = find_inception_weights(None)
        if path is None:
            raise ConfigError(missing_inception_message())
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model = build_inception_v3(state)
        except Exception as exc:  # not a state_dict, or not InceptionV3's
            raise ConfigError(f"InceptionV3 weights {str(path)!r} cannot be loaded ({str(exc).splitlines()[0][:200]}): "
                              f"expected torchvision's {INCEPTION_FILE} ({INCEPTION_URL})") from None
        super().__init__(model, device)
        self.identity = f"inception_v3-{file_sha256(path)[:16]}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        x = images.to(self.device, torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        return self.model(x).float(), None


def resolve_extractor_name(eval_cfg: Any, demo_data: bool) -> Optional[str]:
    """eval.extractor=auto: digits on the demo data, inception where its weights are found,
    else None (no evaluation, with a note). An explicit choice is returned as it is."""
    if eval_cfg.extractor != "auto":
        return eval_cfg.extractor
    if demo_data:
        return "digits"
    if eval_cfg.inception_download or find_inception_weights(eval_cfg.inception_weights) is not None:
        return "inception"
    return None


def build_extractor(name: str, device: torch.device, eval_cfg: Any = None) -> Extractor:
    if name == "digits":
        return DigitsExtractor(device)
    if name == "inception":
        return InceptionExtractor(device, getattr(eval_cfg, "inception_weights", None),
                                  bool(getattr(eval_cfg, "inception_download", False)))
    raise ConfigError(f"eval.extractor={name!r} is not one of: auto, digits, inception")
