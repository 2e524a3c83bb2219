"""StyleGAN2 (Karras et al. 2020, config F): the `model.arch=stylegan2` family.

Settings are `model.stylegan2.*`; the sizes left unset come from the preset, stylegan2-ada-pytorch's
`cfg_specs` (`stylegan2`, `paper256`). Besides z, G takes per-sample draws (style mixing, noise
inputs) that are functions of (run.seed, global sample index) only, and the recipe gets a lazy
Greg phase with path-length regularisation (docs/models.md). Conditional when model.num_classes > 0,
as the reference: G's mapping network embeds the one-hot label next to z, and D's logit is the
projection of its last features onto a mapping of the label.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from gan_dist import rng
from gan_dist.models.spec import ModelSpec
from gan_dist.models.stylegan2.networks import (Discriminator, Generator, MappingNetwork, channels_at,
                                                reset_parameters_)

# stylegan2-ada-pytorch train.py cfg_specs: fmaps * 32768 -> channel_base, map, mbstd; train.py sets
# conv_clamp=256 for every configuration
PRESETS: dict[str, dict[str, Any]] = {
    "stylegan2": dict(channel_base=32768, channel_max=512, mapping_layers=8, mbstd_group=4, conv_clamp=256.0),
    "paper256": dict(channel_base=16384, channel_max=512, mapping_layers=8, mbstd_group=8, conv_clamp=256.0),
    "none": {},
}
SIZES = ("channel_base", "channel_max", "mapping_layers", "mbstd_group", "conv_clamp")
MIN_RES, MAX_RES = 32, 1024
# sub-streams of a sample's seed (rng.STYLEGAN2): style mixing, and Greg's own draws
_MIX_Z, _MIX_P, _MIX_CUT, _PL, _PL_Z, _PL_NOISE = 1, 2, 3, 4, 5, 6


def sizes(sg: Any) -> dict[str, Any]:
    """The preset's sizes with the keys the config sets; ConfigError naming a key left unset."""
    from gan_dist.config import ConfigError

    if sg.preset not in PRESETS:
        raise ConfigError(f"model.stylegan2.preset={sg.preset!r} is not one of: {', '.join(PRESETS)}")
    out = dict(PRESETS[sg.preset])
    for key in SIZES:
        if getattr(sg, key) is not None:
            out[key] = getattr(sg, key)
        if key not in out:
            raise ConfigError(f"model.stylegan2.{key} is unset and model.stylegan2.preset=none gives no value")
    out["conv_clamp"] = float(out["conv_clamp"]) or None
    return out


def check(model_cfg: Any) -> None:
    from gan_dist.config import ConfigError

    sg, R = model_cfg.stylegan2, model_cfg.resolution
    if isinstance(R, bool) or not isinstance(R, int) or R < MIN_RES or R > MAX_RES or R & (R - 1):
        raise ConfigError(f"model.resolution={R!r}: model.arch=stylegan2 supports powers of two from "
                          f"{MIN_RES} to {MAX_RES}")
    if model_cfg.channels not in (1, 3):
        raise ConfigError(f"model.channels={model_cfg.channels!r} must be 1 or 3")
    k = model_cfg.num_classes
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ConfigError(f"model.num_classes={k!r} must be an integer >= 0 once the data is known "
                          "(0: unconditional)")
    s = sizes(sg)
    for key in ("z_dim", "w_dim"):
        if getattr(sg, key) <= 0:
            raise ConfigError(f"model.stylegan2.{key}={getattr(sg, key)!r} must be a positive integer")
    for key in ("channel_base", "channel_max", "mapping_layers", "mbstd_group"):
        if s[key] <= 0:
            raise ConfigError(f"model.stylegan2.{key}={s[key]!r} must be a positive integer")
    if channels_at(R, s["channel_base"], s["channel_max"]) < 1:
        raise ConfigError(f"model.stylegan2.channel_base={s['channel_base']} gives 0 channels at "
                          f"model.resolution={R} (channel_base // resolution): use at least {R}")
    if s["conv_clamp"] is not None and s["conv_clamp"] < 0:
        raise ConfigError(f"model.stylegan2.conv_clamp={s['conv_clamp']!r} must be >= 0 (0: off)")
    for key in ("style_mixing", "w_avg_beta", "pl_decay"):
        if not 0 <= getattr(sg, key) <= 1:
            raise ConfigError(f"model.stylegan2.{key}={getattr(sg, key)!r} must be in [0, 1]")
    if not 0 < sg.mapping_lr_mult:
        raise ConfigError(f"model.stylegan2.mapping_lr_mult={sg.mapping_lr_mult!r} must be > 0")
    if sg.pl_weight < 0:
        raise ConfigError(f"model.stylegan2.pl_weight={sg.pl_weight!r} must be >= 0 (0: off)")
    for key in ("pl_every", "pl_batch_shrink"):
        if getattr(sg, key) < 1:
            raise ConfigError(f"model.stylegan2.{key}={getattr(sg, key)!r} must be a positive integer")


def num_ws(resolution: int) -> int:
    """w vectors G consumes: two per resolution above 4x4, one at 4x4, plus the last toRGB."""
    return 2 * int(math.log2(resolution)) - 2


def sample_seeds(seed: int, indices: Sequence[int]) -> tuple[int, ...]:
    """One integer per sample, from which all of its StyleGAN2 draws derive."""
    return tuple(rng.mix(seed, rng.STYLEGAN2, int(i)) for i in indices)


def inputs_from_seeds(seeds: Sequence[int], z_dim: int, n_ws: int, mixing: float,
                      device: Any) -> dict[str, Any]:
    """G's keyword inputs for samples with these seeds: noise seeds, and style mixing (with
    probability `mixing` a sample takes a second latent's w from a cutoff drawn uniformly in
    [1, num_ws); otherwise its cutoff is num_ws, nothing mixed). Per sample, not per batch as in
    the reference: a batch-wide draw would depend on how the batch is split across ranks."""
    out: dict[str, Any] = {"noise_seeds": tuple(seeds)}
    if mixing > 0 and n_ws > 1:
        u = rng.randint_by_index(0, _MIX_P, seeds, 1 << 24).double() / (1 << 24)
        cutoff = rng.randint_by_index(0, _MIX_CUT, seeds, n_ws - 1) + 1
        out["mix_cutoff"] = torch.where(u < mixing, cutoff, torch.full_like(cutoff, n_ws)).to(device)
        out["mix_z"] = rng.randn_by_index(0, _MIX_Z, seeds, (z_dim,), device)
    return out


class PathLength:
    """StyleGAN2's path-length penalty, E (|J_w^T y| - a)^2 with y ~ N(0, I)/sqrt(H W) and `a`
    the running mean of the lengths (decay `decay`), on every `shrink`-th sample of the batch
    with latents, mixing and noise of its own (derived from the sample's seed).

    The running mean is updated with the mean length over every rank's samples (one
    all-reduce of one number), so it is the same on every rank and equal to one process's
    with the whole batch."""

    def __init__(self, z_dim: int, w_dim: int, n_ws: int, mixing: float, weight: float, decay: float,
                 shrink: int) -> None:
        self.z_dim, self.w_dim, self.n_ws, self.mixing = z_dim, w_dim, n_ws, mixing
        self.weight, self.decay, self.shrink = weight, decay, shrink
        self.mean = torch.zeros(())

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean = state["mean"].detach().clone().float()

    def __call__(self, strategy: Any, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from gan_dist.distributed import all_reduce_mean

        if "noise_seeds" not in batch.g_inputs:
            raise ValueError("the path-length term needs the batch's StyleGAN2 inputs (ModelSpec.draw_g_inputs)")
        device = batch.z.device
        seeds = tuple(rng.mix(int(s), _PL) for s in batch.g_inputs["noise_seeds"][::self.shrink])
        z = rng.randn_by_index(0, _PL_Z, seeds, (self.z_dim,), device)
        c = batch.fake_c[::self.shrink] if batch.fake_c is not None else None
        # the Jacobian by w is taken through a zero input added to w: G's own output w would be a
        # copy under wrappers that hook module outputs (ZeRO-3) or cast them (bf16 engines)
        delta = torch.zeros(len(seeds), self.n_ws, self.w_dim, device=device, requires_grad=True)
        img = strategy.G(z, c, ws_delta=delta, **inputs_from_seeds(seeds, self.z_dim, self.n_ws, self.mixing, device))
        H, W = img.shape[2], img.shape[3]
        y = rng.randn_by_index(0, _PL_NOISE, seeds, tuple(img.shape[1:]), device) / math.sqrt(H * W)
        grad = strategy.input_grad((img * y.to(img.dtype)).sum(), delta, "G").float()
        lengths = grad.square().sum(dim=2).mean(dim=1).sqrt()
        local_mean = lengths.mean()
        mean = self.mean.to(device).lerp(all_reduce_mean(local_mean.detach()), self.decay)
        self.mean = mean
        dev = lengths - mean
        penalty = dev.square().mean()
        # As in the reference, the gradient also flows through the new mean's share of this batch,
        # m = (1 - decay) a + decay * mean(lengths): d/dtheta of E (l - m)^2 has the term
        # -decay * E[2 (l - m)] * grad mean(l). Written with the all-ranks E[2 (l - m)], it is the
        # gradient of the whole batch when each rank's gradients are averaged.
        s_bar = all_reduce_mean((2 * dev).mean().detach())
        surrogate = penalty - self.decay * s_bar * local_mean
        # every parameter of G takes part in the backward (toRGB biases have no input gradient)
        loss = surrogate * self.weight + img.float().sum() * 0.0
        return loss, {"loss/pl": penalty.detach(), "pl/mean": mean}


def _units(module: nn.Module) -> list[nn.Module]:
    if isinstance(module, Generator):
        return [module.mapping, *module.synthesis.blocks]
    return [*module.blocks, *([module.mapping] if module.mapping is not None else []), module.epilogue]


def _recompute_units(module: nn.Module) -> list[nn.Module]:
    # G's mapping network updates its tracked average of w (an all-reduce) in every training
    # forward: a recomputation would update it twice. Its activations are a few vectors per sample.
    return [u for u in _units(module) if not getattr(u, "tracks_w_avg", False)]


def spec(model_cfg: Any) -> ModelSpec:
    sg = model_cfg.stylegan2
    C, R = model_cfg.channels, model_cfg.resolution
    K = model_cfg.num_classes
    s = sizes(sg)
    n_ws = num_ws(R) if isinstance(R, int) and R >= 4 else 0

    def extra_phases(cfg: Any) -> list:
        from gan_dist.recipe import Phase

        if sg.pl_weight == 0:
            return []
        k = sg.pl_every
        term = PathLength(sg.z_dim, sg.w_dim, n_ws, sg.style_mixing, sg.pl_weight, sg.pl_decay, sg.pl_batch_shrink)
        return [(Phase("Greg", "G", ("pl",), every=k, weight=float(k), second_order=True), {"pl": term})]

    return ModelSpec(
        family="stylegan2", z_dim=sg.z_dim, num_classes=K, channels=C, resolution=R,
        make_generator=lambda: Generator(sg.z_dim, sg.w_dim, R, C, s["mapping_layers"], s["channel_base"],
                                         s["channel_max"], s["conv_clamp"], sg.mapping_lr_mult, sg.w_avg_beta, K),
        make_discriminator=lambda: Discriminator(R, C, s["channel_base"], s["channel_max"], s["mbstd_group"],
                                                 s["conv_clamp"], K),
        init=reset_parameters_, shard_units=_units, recompute_units=_recompute_units, check=check,
        draw_g_inputs=lambda seed, indices, device: inputs_from_seeds(
            sample_seeds(seed, indices), sg.z_dim, n_ws, sg.style_mixing, device),
        extra_phases=extra_phases)


__all__ = ["Generator", "Discriminator", "MappingNetwork", "PathLength", "PRESETS", "spec", "check", "num_ws",
           "inputs_from_seeds", "sample_seeds"]
