"""Activation checkpointing of the shard units: their activations are recomputed in the backward
instead of being kept from the forward (train.activation_checkpointing).

Each unit (a block of G or D, the model spec's `checkpoint_units`) runs its own forward under
non-reentrant `torch.utils.checkpoint` (`_checkpointed_forward`, set as the unit's `forward`):
the module tree, the parameter names and the state_dict keys stay those of the plain model
(checkpoints load either way). It is applied before wrapping, so the module's hooks stay
outside the checkpointed call: FSDP2's `fully_shard` gathers a unit around it, and its
pre-backward hook has gathered the unit again when the backward recomputes it. DDP and ZeRO
0-2 touch only gradients. What it costs: one more forward of each checkpointed unit per
backward through it.

Why not torch.distributed._composable.checkpoint (hooks, keys unchanged too): it enters its
recomputation context once only (`_no_hook`, a generator context manager), and a double backward
recomputes a unit twice, the second time failing with "AttributeError: '_GeneratorContextManager'
object has no attribute 'args'" (torch 2.14.1). checkpoint_wrapper renames every key.

Exactness. A recomputation repeats the forward's arithmetic, so the saved tensors it gives back
are bitwise those of the forward; torch restores the RNG state for it (preserve_rng_state), and
gan_dist draws its per-sample randomness from (seed, step, index) anyway (gan_dist.rng).
Double backward (R1/R2, path length): autograd.grad(create_graph=True) unpacks recomputed
tensors attached to the forward graph's nodes, so the outer backward differentiates the same
graph as without checkpointing (and recomputes again). tests/test_activation_checkpointing.py
checks equal weights and buffers with and without, every family and phase.

Side effects of a forward must happen once. BatchNorm's running statistics: a recomputation
updates them again, and `_NoStatUpdates` puts back the values they had before it, so the
buffers move once per forward. Other updates in a forward (StyleGAN2's tracked average of w,
with its all-reduce) are the family's business: its spec leaves such units out of
`checkpoint_units` (ModelSpec.recompute_units).
"""
from __future__ import annotations

import contextlib
import types
from typing import Any, Sequence

import torch
import torch.utils.checkpoint
from torch import nn

from gan_dist.config import ConfigError

KEY = "train.activation_checkpointing"
MODELS = ("G", "D")


def checkpointed_models(value: Any) -> tuple[str, ...]:
    """The models `train.activation_checkpointing` names: false (none), true (G and D), or the
    models themselves, "G", "D", "G,D" (or a YAML list)."""
    if isinstance(value, bool):
        return MODELS if value else ()
    names = value.split(",") if isinstance(value, str) else value
    if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
        names = [n.strip() for n in names if n.strip()]
        if names and all(n in MODELS for n in names):
            return tuple(m for m in MODELS if m in names)
    raise ConfigError(f"{KEY}={value!r} is not one of: false, true (G and D), G, D, \"G,D\" "
                      "(the models whose blocks recompute their activations in the backward)")


def validate(cfg: Any) -> None:
    """Refuse what checkpointing cannot be combined with, naming the keys (the ZeRO stage a
    DeepSpeed JSON sets is checked again when the strategy reads it: `refuse_zero3`)."""
    if not checkpointed_models(cfg.train.activation_checkpointing):
        return
    if cfg.train.compile:
        # under torch.compile, torch.utils.checkpoint takes only a context_fn that returns two
        # TorchDispatchModes ("In torch.compile mode, `context_fn` ... must generate a tuple of
        # two `TorchDispatchMode`s", torch 2.14.1), and the recomputation context here (BatchNorm
        # statistics put back) is not one; compile is refused with the penalties anyway
        raise ConfigError(f"{KEY} cannot be combined with train.compile=true: use one of them")
    if cfg.parallel.strategy == "deepspeed":
        refuse_zero3(cfg.parallel.deepspeed.zero_stage, "parallel.deepspeed.zero_stage=3")


def refuse_zero3(stage: Any, source: str) -> None:
    """ZeRO-3 gathers each sub-module's parameters in its forward hooks and releases them in its
    backward hooks. A recomputation, inside the backward, runs the sub-modules' forward hooks
    again, and DeepSpeed's bookkeeping breaks (0.19.8, 2 ranks, StyleGAN2's Dmain backward:
    "AssertionError: active_backward_submodules is empty during backward pass"). Making each
    checkpointed unit a ZeRO-3 leaf module (`deepspeed.utils.set_z3_leaf_module`: hooks on the
    unit only) gets past that, but a leaf reduces its gradients in a backward hook of each call,
    and D is called twice per update (reals, fakes): "assert len(set(p.ds_id for p in
    params_in_bucket)) == len(params_in_bucket)" in stage3.py, even for DCGAN without a penalty.
    ZeRO stages 0-2 partition no parameters and train exactly with it."""
    if stage == 3:
        raise ConfigError(f"{KEY} cannot be combined with DeepSpeed ZeRO-3 ({source}): use ZeRO stage 0-2, "
                          f"or parallel.strategy=fsdp (sharded parameters with checkpointing), or {KEY}=false")


def apply_activation_checkpointing(units: Sequence[nn.Module]) -> int:
    """Checkpoint each of `units` in place (idempotent); returns how many were new."""
    count = 0
    for unit in units:
        if is_checkpointed(unit):
            continue
        # plain attributes, not sub-modules: the state_dict is untouched; deepcopy rebinds both
        unit._gan_dist_norms = [m for m in unit.modules()
                                if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]
        unit.forward = types.MethodType(_checkpointed_forward, unit)
        count += 1
    return count


def _checkpointed_forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The unit's own forward under torch.utils.checkpoint (non-reentrant). The module's hooks
    (FSDP2's gathering, ZeRO-3's) stay outside, around this call; a recomputation reruns the
    forward alone."""
    forward = type(module).forward.__get__(module)
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)  # nothing would be saved: sampling, evaluation
    norms = module._gan_dist_norms
    return torch.utils.checkpoint.checkpoint(
        forward, *args, use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _NoStatUpdates(norms)), **kwargs)


class _NoStatUpdates:
    """The norm layers' running statistics as they were before a recomputation, after it: the
    recomputation runs the forward's training-mode arithmetic (and saves the same tensors), and
    its update of the statistics is undone, bitwise. Re-entrant: a double backward recomputes
    a unit once per backward with one context."""

    def __init__(self, norms: Sequence[nn.Module]) -> None:
        self.buffers = [buf for m in norms for buf in (m.running_mean, m.running_var, m.num_batches_tracked)
                        if buf is not None]
        self.kept: list[list[torch.Tensor]] = []

    def __enter__(self) -> None:
        self.kept.append([buf.clone() for buf in self.buffers])

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for buf, value in zip(self.buffers, self.kept.pop()):
                buf.copy_(value)


def is_checkpointed(module: nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return getattr(forward, "__func__", None) is _checkpointed_forward
