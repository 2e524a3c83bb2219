"""What the launcher asks of a run: the settings `accelerate launch` passes in its environment
(flags or its config file) turned into gan_dist config keys, or refused with a reason, and the
CPU threads each process gets.
"""
from __future__ import annotations

import os
from typing import Any, Optional

from gan_dist.config import ConfigError, validate, was_set


def launcher_requests(env: Optional[dict] = None) -> dict[str, Any]:
    """Settings that `accelerate launch` (flags or its config file) asks for, as config keys."""
    env = dict(os.environ) if env is None else env
    out: dict[str, Any] = {}
    mixed = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if mixed not in ("no", ""):
        out["train.precision"] = mixed  # "no" leaves train.precision as configured
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        out["parallel.strategy"] = "fsdp"
        out.update(fsdp_requests(env))
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        out["parallel.strategy"] = "deepspeed"
        out.update(deepspeed_requests(env))
    dynamo = env.get("ACCELERATE_DYNAMO_BACKEND", "no").lower()
    if dynamo not in ("no", ""):
        out["train.compile"] = dynamo
    return out


FSDP_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "HYBRID_SHARD_ZERO2")


def _flag(env: dict, name: str) -> Optional[bool]:
    value = env.get(name)
    if value in (None, ""):
        return None
    if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise ConfigError(f"accelerate launch sets {name}={value!r}, which is not true or false")
    return value.lower() in ("true", "1", "yes")


def fsdp_requests(env: dict) -> dict[str, Any]:
    """accelerate's FSDP settings (FSDP_* variables) as gan_dist keys; what FSDP2 per block
    cannot do is refused. Both FSDP versions run as torch's fully_shard on each block of G and D."""
    out: dict[str, Any] = {}
    version = env.get("FSDP_VERSION", "1")
    strategy = env.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").upper()
    if strategy.isdigit() and 1 <= int(strategy) <= len(FSDP_STRATEGIES):
        strategy = FSDP_STRATEGIES[int(strategy) - 1]
    if strategy == "NO_SHARD":
        raise ConfigError("accelerate launch asks for FSDP sharding strategy NO_SHARD: that is data "
                          "parallelism, use parallel.strategy=ddp (accelerate launch --multi_gpu)")
    if strategy not in ("FULL_SHARD", "SHARD_GRAD_OP"):
        raise ConfigError(f"accelerate launch asks for FSDP sharding strategy {strategy}: gan_dist supports "
                          "FULL_SHARD and SHARD_GRAD_OP (fsdp_reshard_after_forward true/false)")
    reshard = env.get("FSDP_RESHARD_AFTER_FORWARD")
    if version == "2" and reshard not in (None, ""):
        out["parallel.fsdp.reshard_after_forward"] = _flag(env, "FSDP_RESHARD_AFTER_FORWARD")
    elif version != "2" and (reshard or env.get("FSDP_SHARDING_STRATEGY")):
        # FSDP1 names: FULL_SHARD reshards after forward, SHARD_GRAD_OP keeps the gathered blocks
        name = reshard.upper() if reshard and reshard.lower() not in ("true", "false") else strategy
        if name.isdigit() and 1 <= int(name) <= len(FSDP_STRATEGIES):
            name = FSDP_STRATEGIES[int(name) - 1]
        if name not in ("FULL_SHARD", "SHARD_GRAD_OP", "NO_RESHARD"):
            raise ConfigError(f"accelerate launch asks for FSDP_RESHARD_AFTER_FORWARD={reshard!r}: gan_dist "
                              "supports FULL_SHARD, SHARD_GRAD_OP or true/false with fsdp_version 2")
        out["parallel.fsdp.reshard_after_forward"] = name == "FULL_SHARD"
    if _flag(env, "FSDP_OFFLOAD_PARAMS") is not None:
        out["parallel.fsdp.cpu_offload"] = _flag(env, "FSDP_OFFLOAD_PARAMS")
    refused = {
        "FSDP_ACTIVATION_CHECKPOINTING": "activation checkpointing is not supported",
        "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD": "activation checkpointing is not supported",
        "FSDP_FORWARD_PREFETCH": "explicit forward prefetch is not supported",
    }
    for name, why in refused.items():
        if _flag(env, name):
            raise ConfigError(f"accelerate launch sets {name}=true: {why} by gan_dist's FSDP; set it to false")
    for name in ("FSDP_AUTO_WRAP_POLICY", "FSDP_TRANSFORMER_CLS_TO_WRAP", "FSDP_IGNORED_MODULES"):
        if env.get(name, ""):
            raise ConfigError(f"accelerate launch sets {name}={env[name]!r}: gan_dist shards each block of G "
                              "and D itself; remove this setting from the accelerate config")
    prefetch = env.get("FSDP_BACKWARD_PREFETCH", "BACKWARD_PRE").upper()
    if prefetch not in ("", "BACKWARD_PRE"):
        raise ConfigError(f"accelerate launch sets FSDP_BACKWARD_PREFETCH={prefetch}: gan_dist's FSDP always "
                          "prefetches the next block before its backward (BACKWARD_PRE)")
    return out


def deepspeed_requests(env: dict) -> dict[str, Any]:
    """accelerate's DeepSpeed settings (ACCELERATE_DEEPSPEED_* and friends) as gan_dist keys."""
    out: dict[str, Any] = {}
    prefix = "ACCELERATE_DEEPSPEED_"

    def number(name: str, kind: type) -> Optional[Any]:
        value = env.get(name, "")
        if value.lower() in ("", "auto", "none"):
            return None
        try:
            return kind(value)
        except ValueError:
            raise ConfigError(f"accelerate launch sets {name}={value!r}, which is not a number") from None

    stage = number(prefix + "ZERO_STAGE", int)
    if stage is not None:
        out["parallel.deepspeed.zero_stage"] = stage
    if env.get(prefix + "CONFIG_FILE", "").lower() not in ("", "none"):
        out["parallel.deepspeed.config"] = env[prefix + "CONFIG_FILE"]
    accum = number("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", int)
    if accum is not None:
        out["train.grad_accum"] = accum
    clip = number("ACCELERATE_GRADIENT_CLIPPING", float)
    if clip is not None:
        out["parallel.deepspeed.gradient_clipping"] = clip
    for what in ("optimizer", "param"):
        device = env.get(f"{prefix}OFFLOAD_{what.upper()}_DEVICE", "").lower()
        if device in ("none", "cpu"):
            out[f"parallel.deepspeed.offload_{what}"] = device
        elif device:
            raise ConfigError(f"accelerate launch asks to offload the {what}s to {device!r}: gan_dist supports "
                              f"none or cpu (parallel.deepspeed.offload_{what})")
    if _flag(env, prefix + "ZERO3_INIT"):
        raise ConfigError("accelerate launch sets zero3_init_flag=true: gan_dist builds G and D whole on each "
                          "rank and shards them afterwards; set zero3_init_flag: false")
    if env.get(prefix + "MOE_LAYER_CLS_NAMES", ""):
        raise ConfigError("accelerate launch sets deepspeed_moe_layer_cls_names: GAN models have no MoE layers "
                          "in gan_dist; remove it")
    return out


def apply_launcher_requests(cfg: Any, config_path: Optional[str], overrides: list[str],
                            env: Optional[dict] = None) -> None:
    """Honour what accelerate asked for, or refuse it; never ignore it."""
    for key, value in launcher_requests(env).items():
        *parents, name = key.split(".")
        owner = cfg
        for part in parents:
            owner = getattr(owner, part)
        current = getattr(owner, name)
        if key == "train.precision" and value not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"accelerate launch asks for mixed precision {value!r}; gan_dist supports "
                              "bf16 and fp16 (set train.precision, or --mixed_precision no|bf16|fp16)")
        if key == "train.compile":
            if value != "inductor":
                raise ConfigError(f"accelerate launch asks for dynamo backend {value!r}; gan_dist compiles "
                                  "with inductor only (--dynamo_backend inductor, or train.compile=true)")
            value = True
        explicit = was_set(overrides, config_path, key)
        if key == "parallel.strategy" and current == "auto":
            explicit = False
        if explicit and current != value:
            raise ConfigError(f"accelerate launch asks for {key}={value} but the config sets {key}={current}: "
                              "change one of them")
        setattr(owner, name, value)
    validate(cfg)  # the launcher's values obey the same rules as the config's


def configure_threads(cfg: Any, local_world_size: int, launcher: str) -> None:
    """CPU threads per process: run.threads, else the cores shared among this node's processes.

    accelerate launch sets OMP_NUM_THREADS=1 by default, which would halve a 2-core CPU run;
    an OMP_NUM_THREADS set by the user (any other launcher) is respected.
    """
    import torch

    n = cfg.run.threads
    if n == 0:
        user_omp = os.environ.get("OMP_NUM_THREADS") if launcher != "accelerate" else None
        n = int(user_omp) if user_omp else max(1, (os.cpu_count() or 1) // max(1, local_world_size))
    torch.set_num_threads(n)
