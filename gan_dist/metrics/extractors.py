"""Feature extractors: the offline digits classifier, and the standard networks of the
published metrics, run through torch-fidelity's implementations.

An extractor maps images in [-1, 1] (N x C x H x W) to named outputs: always `features` (what
FD, KID or precision/recall compare), plus `probs` (digit classes, for class coverage) or
`logits` (Inception's 1008 classes, for the Inception Score). `identity` names the network
and its weights, so that cached reference statistics are never reused with another network.

The standard networks are those every published FID, KID, IS and precision/recall use:
- `inception`: the TensorFlow Inception graph of 2015-12-05, as ported by pytorch-fid and
  torch-fidelity (torchmetrics uses the same port): 2048-d pool features, 1008 logits,
  TensorFlow 1.x's bilinear resize to 299 x 299.
- `vgg16`: torchvision's ImageNet VGG16, fc2 features after the ReLU (torch-fidelity's
  precision/recall), bilinear resize to 224 x 224, ImageNet normalisation.
Both take 8-bit RGB: images are quantised as a saved PNG would be (round((x + 1) * 127.5)) and
gray ones repeated to three channels, as PIL's convert("RGB") does for the reference tools.

Nothing is downloaded. torch-fidelity would fetch the weights itself, or unpickle a file given
to it with weights_only=False; here the file is read with torch.load(weights_only=True) and
the state is handed to torch-fidelity's module.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from gan_dist.config import ConfigError

Outputs = dict[str, torch.Tensor]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


class Extractor:
    """Images in [-1, 1] -> {"features": (N, D), and "probs" or "logits" where meaningful}."""

    name: str = ""
    fd_key: str = "fd"  # the Frechet distance's name in logs: "digits_fd", "fid"
    feature_dim: int = 0
    identity: str = ""
    outputs: dict[str, int] = {}  # output name -> width

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = device

    def check_images(self, channels: int, resolution: int) -> None:
        """Raise ConfigError when images of this shape cannot be embedded."""

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> Outputs:
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
        self.outputs = {"features": self.feature_dim, "probs": model.arch["num_classes"]}
        self.identity = f"digits-{file_sha256(WEIGHTS_PATH)[:16]}"

    def check_images(self, channels: int, resolution: int) -> None:
        from gan_dist.metrics.digits import IMAGE_SIZE

        if channels != 1 or resolution != IMAGE_SIZE:
            raise ConfigError(
                f"eval.extractor=digits measures 1 x {IMAGE_SIZE} x {IMAGE_SIZE} handwritten digits, but the images "
                f"are {channels} x {resolution} x {resolution}: use eval.extractor=inception (FID) "
                "(or eval.enabled=false)")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> Outputs:
        feats = self.model.features(images.to(self.device, torch.float32))
        probs = self.model.head(feats).softmax(dim=1)
        return {"features": feats.float(), "probs": probs.float()}


# ---- the standard networks --------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightsSpec:
    """Where a standard network's weights come from and where gan_dist looks for them."""

    network: str  # what the file must hold, in words
    config_key: str
    env: str
    files: tuple[str, ...]  # accepted file names in torch's hub cache (checkpoints/)
    urls: tuple[str, ...]  # where the files are published

    def cache_paths(self) -> list[Path]:
        return [Path(torch.hub.get_dir()) / "checkpoints" / f for f in self.files]

    def find(self, configured: Optional[str]) -> Optional[Path]:
        """The config key, else the environment variable, else torch's hub cache; None if absent."""
        for source, value in ((self.config_key, configured), (self.env, os.environ.get(self.env))):
            if value:
                path = Path(value).expanduser()
                if not path.is_file():
                    raise ConfigError(f"{source}={value!r}: no such file ({self.network}: {self.files[0]} "
                                      f"from {self.urls[0]})")
                return path
        return next((p for p in self.cache_paths() if p.is_file()), None)

    def missing_message(self, metric: str) -> str:
        return (f"{metric} needs the {self.network}, and no weights file was found (nothing is downloaded at run "
                f"time). Download {self.urls[0]} on a machine with network access and either set "
                f"{self.config_key}=/path/to/{self.files[0]}, or the environment variable {self.env}, or put the "
                f"file at {self.cache_paths()[0]}. See docs/evaluation.md. Offline, the digits demo can use "
                "eval.extractor=digits, and eval.enabled=false turns evaluation off.")


INCEPTION = WeightsSpec(
    network="2015-12-05 TensorFlow Inception of FID (pytorch-fid's / torch-fidelity's port)",
    config_key="eval.inception_weights", env="GAN_DIST_INCEPTION_WEIGHTS",
    files=("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth"),
    urls=("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
          "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"))
VGG16 = WeightsSpec(
    network="torchvision ImageNet VGG16 (IMAGENET1K_V1) of precision/recall",
    config_key="eval.vgg16_weights", env="GAN_DIST_VGG16_WEIGHTS",
    files=("vgg16-397923af.pth",), urls=("https://download.pytorch.org/models/vgg16-397923af.pth",))
INCEPTION_ENV = INCEPTION.env
INCEPTION_FILE = INCEPTION.files[0]


def load_state(path: Path, spec: WeightsSpec) -> dict[str, torch.Tensor]:
    """A state_dict read without unpickling code; a damaged or foreign file -> ConfigError naming it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or objects that are not tensors
        raise ConfigError(f"{spec.config_key}: {str(path)!r} cannot be loaded as weights "
                          f"({str(exc).splitlines()[0][:160]}); expected the {spec.network}, {spec.files[0]} "
                          f"from {spec.urls[0]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{spec.config_key}: {str(path)!r} is not a state_dict of tensors; expected the "
                          f"{spec.network}, {spec.files[0]} from {spec.urls[0]}")
    return state


@contextlib.contextmanager
def _replaced(module: Any, name: str, value: Any) -> Iterator[None]:
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def _wrong_network(path: Optional[Path], spec: WeightsSpec, exc: Exception, hint: str = "") -> ConfigError:
    detail = str(exc).splitlines()
    shown = "; ".join(line.strip() for line in detail[:3])[:300]
    return ConfigError(f"{spec.config_key}: {str(path)!r} holds other weights than the {spec.network}{hint} "
                       f"({shown}); get {spec.files[0]} from {spec.urls[0]}")


def build_fidelity_inception(state: Optional[dict[str, torch.Tensor]], path: Optional[Path] = None) -> nn.Module:
    """torch-fidelity's 2015-12-05 Inception with `state` (None: its random initialisation),
    giving the 2048-d pool features and the unbiased 1008 logits."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    class Inception(tfi.FeatureExtractorInceptionV3):
        def load_state_dict(self, sd: Any, strict: bool = True, assign: bool = False) -> Any:
            return None if sd is None else super().load_state_dict(sd, strict=strict, assign=assign)

    # its constructor fetches the URL's weights through torch.hub: hand it ours instead
    with _replaced(tfi, "load_state_dict_from_url", lambda *args, **kwargs: state):
        try:
            return Inception("inception-v3-compat", ["2048", "logits_unbiased"])
        except RuntimeError as exc:  # missing / unexpected keys, wrong shapes
            hint = (": this looks like torchvision's ImageNet InceptionV3 (inception_v3_google-*.pth), whose FID "
                    "differs from the published numbers" if state is not None and any(
                        k.startswith("AuxLogits.") for k in state) else "")
            raise _wrong_network(path, INCEPTION, exc, hint) from None


def build_fidelity_vgg16(state: Optional[dict[str, torch.Tensor]], path: Optional[Path] = None) -> nn.Module:
    """torch-fidelity's VGG16 feature extractor (fc2 after ReLU) with torchvision's VGG16 `state`."""
    import torch_fidelity.feature_extractor_vgg16 as tfv
    import torchvision

    vgg = torchvision.models.vgg16(weights=None)
    if state is not None:
        try:
            vgg.load_state_dict(state)
        except RuntimeError as exc:
            raise _wrong_network(path, VGG16, exc) from None
    with _replaced(tfv, "torchvision_load_pretrained_vgg16", lambda **kwargs: vgg):
        return tfv.FeatureExtractorVGG16("vgg16", ["fc2_relu"])


def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (N, C, H, W) -> uint8 RGB, as the images would be saved and read back."""
    x = images.float().clamp(-1.0, 1.0).add(1.0).mul(127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise ValueError(f"images with {x.shape[1]} channels: the standard networks take gray or RGB")
    return x.contiguous()


class FidelityExtractor(Extractor):
    """A torch-fidelity network with weights the user supplied (see WeightsSpec)."""

    spec: WeightsSpec
    metric_names: str = ""  # for the missing-weights message

    def __init__(self, device: torch.device, weights: Optional[str] = None) -> None:
        path = self.spec.find(weights)
        if path is None:
            raise ConfigError(self.spec.missing_message(self.metric_names))
        model = self.build(load_state(path, self.spec), path)
        super().__init__(model, device)
        self.path = path
        self.identity = f"{self.name}-{file_sha256(path)[:16]}"

    @staticmethod
    def build(state: dict[str, torch.Tensor], path: Path) -> nn.Module:
        raise NotImplementedError


class InceptionExtractor(FidelityExtractor):
    """FID, KID (2048-d pool features) and IS (logits) on the 2015-12-05 Inception."""

    name = "inception"
    fd_key = "fid"
    feature_dim = 2048
    outputs = {"features": 2048, "logits": 1008}
    spec = INCEPTION
    metric_names = "FID, KID and IS (eval.extractor=inception)"
    build = staticmethod(build_fidelity_inception)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> Outputs:
        feats, logits = self.model(to_uint8_rgb(images).to(self.device))
        return {"features": feats.float(), "logits": logits.float()}


class VGG16Extractor(FidelityExtractor):
    """Precision and recall (Kynkaanniemi et al. 2019) on VGG16's 4096-d fc2 features."""

    name = "vgg16"
    fd_key = "vgg16_fd"
    feature_dim = 4096
    outputs = {"features": 4096}
    spec = VGG16
    metric_names = "Precision/recall (eval.metrics with pr)"
    build = staticmethod(build_fidelity_vgg16)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> Outputs:
        (feats,) = self.model(to_uint8_rgb(images).to(self.device))
        return {"features": feats.float()}


def find_inception_weights(configured: Optional[str]) -> Optional[Path]:
    return INCEPTION.find(configured)


def resolve_extractor_name(eval_cfg: Any, demo_data: bool) -> Optional[str]:
    """eval.extractor=auto: digits on the demo data, inception where its weights are found,
    else None (no evaluation, with a note). An explicit choice is returned as it is."""
    if eval_cfg.extractor != "auto":
        return eval_cfg.extractor
    if demo_data:
        return "digits"
    if find_inception_weights(eval_cfg.inception_weights) is not None:
        return "inception"
    return None


def build_extractor(name: str, device: torch.device, eval_cfg: Any = None) -> Extractor:
    if name == "digits":
        return DigitsExtractor(device)
    if name == "inception":
        return InceptionExtractor(device, getattr(eval_cfg, "inception_weights", None))
    if name == "vgg16":
        return VGG16Extractor(device, getattr(eval_cfg, "vgg16_weights", None))
    raise ConfigError(f"eval.extractor={name!r} is not one of: auto, digits, inception")
