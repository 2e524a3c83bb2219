"""Exponential moving average of the generator's weights (as in StyleGAN2-ADA).

The average is kept for the parameters that this rank holds, whatever the strategy made of
them: the whole tensors (none, DDP: every rank holds the same weights, so every rank computes
the same average), FSDP2's local shards or ZeRO-3's partitions, all reached through the
strategy's shard access (`local_tensor`, `local_slice`, `shards_written`). No update
communicates. Buffers (BatchNorm statistics) are not averaged: they are the live generator's, made equal across ranks by ``strategy.sync_buffers()``;
StyleGAN2-ADA copies them into its EMA generator at every step, which is the same thing.

The EMA weights are used by swapping them into the live module for the duration of a
``with ema.swapped():`` block, then restoring the training weights exactly. Whatever the
strategy does with its own parameters (gather shards in the forward, gather a full
state_dict for export) therefore works on the average too, with no second copy of the model
and no strategy-specific code here.

Half-life and ramp-up: after an update on ``batch`` images at ``cur_nimg`` images seen,

    half_life = half_life_kimg * 1000, or min(that, rampup * cur_nimg) with a ramp-up
    beta      = 0.5 ** (batch / half_life)
    ema       = beta * ema + (1 - beta) * weights

so half the weight of the average lies on the last ``half_life`` images. The ramp-up keeps
the average short early in training, when old weights are far from the current ones.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
from torch import nn

STATE_FORMAT = 1


def ema_beta(batch_nimg: int, cur_nimg: int, half_life_kimg: float, rampup: Optional[float]) -> float:
    """Weight of the old average for an update on `batch_nimg` images at `cur_nimg` images seen."""
    half_life = half_life_kimg * 1000.0
    if rampup is not None:
        half_life = min(half_life, cur_nimg * rampup)
    if half_life <= 0:
        return 0.0  # no memory: the average is the current weights
    return 0.5 ** (batch_nimg / half_life)


class EMA:
    """EMA of `strategy.raw[name]`'s parameters, for the shards this rank holds.

    Every rank calls every method (they are collective where the strategy's are)."""

    def __init__(self, strategy: Any, half_life_kimg: float, rampup: Optional[float], name: str = "G") -> None:
        self.strategy = strategy
        self.name = name
        self.half_life_kimg = float(half_life_kimg)
        self.rampup = rampup
        self.num_updates = 0
        self.beta = 0.0  # of the last update, for logging
        with torch.no_grad():
            self.names = [n for n, _ in self._params()]
            # fp32 whatever the parameters' dtype: a bf16 average cannot absorb updates of 1e-3
            self.shadow = [strategy.local_tensor(p).detach().to(torch.float32, copy=True) for _, p in self._params()]

    @property
    def module(self) -> nn.Module:
        return self.strategy.raw[self.name]

    def _params(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, p) for n, p in self.module.named_parameters() if p.is_floating_point()]

    def _locals(self) -> list[torch.Tensor]:
        params = self._params()
        names = [n for n, _ in params]
        if names != self.names:
            raise RuntimeError(f"the parameters of {self.name} changed since the EMA was created "
                               f"({len(names)} now, {len(self.names)} then)")
        return [self.strategy.local_tensor(p) for _, p in params]

    @torch.no_grad()
    def update(self, cur_nimg: int, batch_nimg: int) -> float:
        """Fold in the current weights after a G update on `batch_nimg` images (all ranks),
        `cur_nimg` being the images seen before that update. Returns beta."""
        beta = ema_beta(batch_nimg, cur_nimg, self.half_life_kimg, self.rampup)
        for s, t in zip(self.shadow, self._locals()):
            s.lerp_(t.to(torch.float32), 1.0 - beta)
        self.num_updates += 1
        self.beta = beta
        return beta

    @contextlib.contextmanager
    def swapped(self) -> Iterator[nn.Module]:
        """The live module holds the EMA weights inside the block, its own weights again after."""
        module = self.module
        with torch.no_grad(), self.strategy.shards_written(self.name):
            locals_ = self._locals()
            backup = [t.detach().clone() for t in locals_]
            for t, s in zip(locals_, self.shadow):
                t.copy_(s)
        try:
            yield module
        finally:
            with torch.no_grad(), self.strategy.shards_written(self.name):
                for t, b in zip(locals_, backup):
                    t.copy_(b)

    def full_state_dict(self) -> Optional[dict[str, torch.Tensor]]:
        """The averaged generator's whole state_dict (EMA parameters, live buffers) on rank 0,
        None elsewhere: what generator_ema.pt holds. Collective."""
        self.strategy.sync_buffers()
        with self.swapped():
            return self.strategy.full_state_dict(self.name)

    @property
    def sharded(self) -> bool:
        return any(self.strategy.local_tensor(p) is not p for _, p in self._params())

    def state_dict(self) -> dict[str, Any]:
        """Full (unsharded) EMA parameters on CPU, for checkpoints. Collective under sharded
        strategies; complete on rank 0 (other ranks may get None in `params`)."""
        if self.sharded:
            full = self.full_state_dict()
            params = None if full is None else {n: full[n].float() for n in self.names}
        else:
            params = {n: s.detach().cpu().clone() for n, s in zip(self.names, self.shadow)}
        return {"format": STATE_FORMAT, "num_updates": self.num_updates, "half_life_kimg": self.half_life_kimg,
                "rampup": self.rampup, "params": params}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`'s output (full tensors) on every rank; each keeps its part."""
        params = state.get("params") if isinstance(state, dict) else None
        if state.get("format") != STATE_FORMAT or params is None:
            raise ValueError("not an EMA state written by gan_dist.ema.EMA.state_dict() "
                             f"(format {state.get('format')!r}, params {'missing' if params is None else 'present'})")
        missing = [n for n in self.names if n not in params]
        if missing:
            raise ValueError(f"EMA state lacks parameters {missing[:5]} of {self.name}: saved from another model?")
        for (n, p), s in zip(self._params(), self.shadow):
            full = params[n]
            if tuple(full.shape) != tuple(p.shape):
                raise ValueError(f"EMA state: {n} has shape {tuple(full.shape)}, the model has {tuple(p.shape)}")
            s.copy_(self.strategy.local_slice(full.to(torch.float32), p))
        self.num_updates = int(state.get("num_updates", 0))


def build_ema(strategy: Any, ema_cfg: Any, name: str = "G") -> Optional[EMA]:
    """The EMA the config asks for (ema.enabled), else None."""
    if not ema_cfg.enabled:
        return None
    return EMA(strategy, ema_cfg.half_life_kimg, ema_cfg.rampup, name)
