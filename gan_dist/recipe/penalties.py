"""Gradient penalties on D: R1 on real images (Mescheder et al. 2018), R2 on generated ones.

    R1 = gamma_1 / 2 * E_x ||grad_x D(x)||^2          R2 = gamma_2 / 2 * E_z ||grad_x D(x)|_{x=G(z)}||^2

The input gradient is a first backward through D whose graph is kept (create_graph=True), so
that the penalty's own backward reaches D's parameters: a double backward. The strategy
computes it (`Strategy.input_grad`), because that is where distribution and loss scaling must
take part: under fp16 the inner backward runs on D's scaled logits and is unscaled before
squaring, and sharded strategies keep D's parameters gathered until the outer backward is done.
The squared norm is taken in fp32 whatever the autocast dtype.
"""
from __future__ import annotations

import torch

PENALTIES = ("r1", "r2")  # r1: on the real images, r2: on the fakes


def squared_grad_norm(strategy, logits: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """E ||d sum(logits) / d inputs||^2 over the batch (per-sample squared norm, then the mean)."""
    grad = strategy.input_grad(logits.sum(), inputs, "D")
    grad = grad.float()
    return grad.square().sum(dim=tuple(range(1, grad.dim()))).mean()
