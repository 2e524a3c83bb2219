"""Randomly initialised weight files of the standard metric networks, in the published layouts
(torch-fidelity's / pytorch-fid's Inception state_dict, torchvision's VGG16 state_dict), so that
tests run offline on exactly the code paths real weights take."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from gan_dist.metrics.extractors import INCEPTION, VGG16, build_fidelity_inception


def _scaled_init(model: nn.Module, seed: int) -> None:
    """He-normal convolutions and linears, so activations neither vanish nor explode through the depth
    (the modules' default initialisation leaves Inception's pool features at ~1e-8)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.01)


def write_inception(folder: Path, seed: int = 0) -> Path:
    model = build_fidelity_inception(None)
    _scaled_init(model, seed)
    with torch.no_grad():
        # logits that differ between images (the pool features share a large positive mean, which
        # rows of zero mean ignore), scaled up: an Inception Score clearly above 1
        model.fc.weight.sub_(model.fc.weight.mean(dim=1, keepdim=True)).mul_(30.0)
    path = Path(folder) / INCEPTION.files[0]
    torch.save(model.state_dict(), path)
    return path


def write_vgg16(folder: Path, seed: int = 1) -> Path:
    import torchvision

    model = torchvision.models.vgg16(weights=None)
    _scaled_init(model, seed)
    path = Path(folder) / VGG16.files[0]
    torch.save(model.state_dict(), path)
    return path
