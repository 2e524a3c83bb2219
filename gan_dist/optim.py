"""The optimizers of G and D, built outside the strategies (which only distribute them).

Adam with train.lr_g / train.lr_d and (train.beta1, train.beta2). A model regularised lazily,
every k steps (reg.d_every = k), gets lr * k/(k+1) and betas ** (k/(k+1)) (Karras et al. 2020,
as in StyleGAN2-ADA): the penalty phase is one more update every k steps, and the rescaling
keeps the optimizer's effective step size and averaging horizon those of k plain updates.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

OptimizerFactory = Callable[..., torch.optim.Optimizer]  # (name, params, fused_ok=True) -> optimizer


def fused_adam_supported(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused Adam runs on these parameters (floating point, on a device it has
    the kernel for); one step for DCGAN-64 on a 2-core CPU: 5 ms fused, 21 ms foreach."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:
        devices = {"cuda"}
    return bool(params) and all(p.is_floating_point() and p.device.type in devices for p in params)


def adam_settings(train_cfg: Any, name: str, reg_interval: int = 1) -> dict[str, Any]:
    """lr and betas of `name`'s Adam, rescaled for a lazy regularisation every `reg_interval` steps."""
    lr = train_cfg.lr_g if name == "G" else train_cfg.lr_d
    beta1, beta2 = float(train_cfg.beta1), float(train_cfg.beta2)
    if reg_interval > 1:
        ratio = reg_interval / (reg_interval + 1)
        lr, beta1, beta2 = lr * ratio, beta1 ** ratio, beta2 ** ratio
    return {"lr": lr, "betas": (beta1, beta2)}


def optimizer_factory(train_cfg: Any, recipe: Any) -> OptimizerFactory:
    """What a strategy calls, once per model and after wrapping it, to get that model's optimizer."""

    def make(name: str, params: list[torch.Tensor], fused_ok: bool = True) -> torch.optim.Optimizer:
        params = list(params)
        kind = {"fused": True} if fused_ok and fused_adam_supported(params) else {"foreach": True}
        return torch.optim.Adam(params, **adam_settings(train_cfg, name, recipe.reg_interval(name)), **kind)

    return make
