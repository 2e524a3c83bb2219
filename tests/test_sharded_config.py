"""Configuration of the sharded strategies: DeepSpeed JSONs with "auto" values, conflicts named,
and accelerate's FSDP/DeepSpeed launch settings honoured or refused. No processes started."""
from __future__ import annotations

import json

import pytest

from gan_dist.config import ConfigError, load_config
from gan_dist.parallel.deepspeed import default_config, load_json, resolve_config
from gan_dist.launcher import apply_launcher_requests, launcher_requests
from tests._mp import REPO

DS_DIR = REPO / "configs" / "deepspeed"


def resolved(overrides=(), conf=None, world_size=2):
    cfg = load_config(None, list(overrides))
    return resolve_config(conf, cfg.train, cfg.parallel.deepspeed, world_size, "cpu", "test.json")


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_shipped_json_is_the_builtin_default_of_its_stage(stage):
    assert load_json(str(DS_DIR / f"zero{stage}.json")) == default_config(stage)
    a = resolved(["train.batch_size=8", "train.grad_accum=2", "train.precision=fp16"],
                 load_json(str(DS_DIR / f"zero{stage}.json")))
    b = resolved(["train.batch_size=8", "train.grad_accum=2", "train.precision=fp16",
                  f"parallel.deepspeed.zero_stage={stage}"])
    assert a == b
    assert a["zero_optimization"]["stage"] == stage
    assert (a["train_micro_batch_size_per_gpu"], a["gradient_accumulation_steps"], a["train_batch_size"]) == (8, 2, 32)
    assert a["fp16"]["enabled"] is True and a["bf16"]["enabled"] is False
    assert a["fp16"]["loss_scale"] == 0  # dynamic loss scaling


def test_auto_values_follow_the_gan_dist_config():
    conf = resolved(["train.precision=bf16", "parallel.deepspeed.gradient_clipping=1.5"])
    assert conf["bf16"]["enabled"] is True and conf["fp16"]["enabled"] is False
    assert conf["gradient_clipping"] == 1.5 and conf["zero_optimization"]["stage"] == 2
    conf = resolved(["parallel.deepspeed.zero_stage=3", "parallel.deepspeed.offload_param=cpu",
                     "parallel.deepspeed.offload_optimizer=cpu"])
    assert conf["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert conf["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert conf["zero_force_ds_cpu_optimizer"] is False


@pytest.mark.parametrize("overrides, conf, named", [
    (["train.batch_size=8"], {"train_micro_batch_size_per_gpu": 4}, "train.batch_size"),
    (["train.grad_accum=1"], {"gradient_accumulation_steps": 2}, "train.grad_accum"),
    (["train.precision=bf16"], {"fp16": {"enabled": True}}, "train.precision"),
    (["train.precision=fp32"], {"bf16": {"enabled": True}}, "train.precision"),
    (["parallel.deepspeed.zero_stage=1"], {"zero_optimization": {"stage": 3}}, "parallel.deepspeed.zero_stage"),
    ([], {"optimizer": {"type": "Adam"}}, "train.lr_g"),
    ([], {"scheduler": {"type": "WarmupLR"}}, "scheduler"),
    ([], {"zero_optimization": {"stage": 7}}, "zero_optimization.stage"),
    (["parallel.deepspeed.offload_param=cpu"], {"zero_optimization": {"stage": 2}}, "stage 3"),
])
def test_contradictions_are_errors_naming_both_sides(overrides, conf, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")) as err:
        resolved(overrides, conf)
    assert "test.json" in str(err.value) or "parallel.deepspeed" in str(err.value)


def test_bad_deepspeed_config_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(None, [f"parallel.deepspeed.config={tmp_path / 'missing.json'}"])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json.*not valid JSON"):
        load_json(str(bad))
    with pytest.raises(ConfigError, match="parallel.strategy"):
        load_config(None, ["parallel.strategy=zero3"])
    with pytest.raises(ConfigError, match="parallel.fsdp.param_dtype"):
        load_config(None, ["parallel.fsdp.param_dtype=fp8"])


def test_fsdp_fp16_parameters_need_loss_scaling():
    from gan_dist.distributed import DistInfo
    from gan_dist.parallel.fsdp import FSDPStrategy

    import torch
    cfg = load_config(None, ["parallel.fsdp.param_dtype=fp16", "train.precision=bf16"])
    info = DistInfo(0, 1, 0, 1, 0, torch.device("cpu"), None, "python")
    with pytest.raises(ConfigError, match="train.precision=fp16"):
        FSDPStrategy(info, cfg.train, cfg.parallel)


# ---- accelerate launch ------------------------------------------------------------------------
FSDP_LAUNCH = {  # what `accelerate launch --use_fsdp` exports with its defaults
    "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1", "FSDP_SHARDING_STRATEGY": "FULL_SHARD",
    "FSDP_RESHARD_AFTER_FORWARD": "true", "FSDP_OFFLOAD_PARAMS": "false", "FSDP_MIN_NUM_PARAMS": "100000000",
    "FSDP_FORWARD_PREFETCH": "false", "FSDP_USE_ORIG_PARAMS": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true",
    "FSDP_SYNC_MODULE_STATES": "true", "FSDP_ACTIVATION_CHECKPOINTING": "false",
    "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD": "false"}


@pytest.mark.parametrize("extra, expected", [
    ({}, {"parallel.fsdp.reshard_after_forward": True, "parallel.fsdp.cpu_offload": False}),
    ({"FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"}, {"parallel.fsdp.reshard_after_forward": False}),
    ({"FSDP_SHARDING_STRATEGY": "2"}, {"parallel.fsdp.reshard_after_forward": False}),
    ({"FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false"}, {"parallel.fsdp.reshard_after_forward": False}),
    ({"FSDP_OFFLOAD_PARAMS": "true"}, {"parallel.fsdp.cpu_offload": True}),
])
def test_accelerate_fsdp_settings_are_honoured(extra, expected):
    out = launcher_requests({**FSDP_LAUNCH, **extra})
    assert out["parallel.strategy"] == "fsdp"
    for key, value in expected.items():
        assert out[key] == value
    cfg = load_config(None, [])
    apply_launcher_requests(cfg, None, [], {**FSDP_LAUNCH, **extra})
    assert cfg.parallel.strategy == "fsdp"
    assert cfg.parallel.fsdp.reshard_after_forward == out["parallel.fsdp.reshard_after_forward"]


@pytest.mark.parametrize("extra, named", [
    ({"FSDP_SHARDING_STRATEGY": "NO_SHARD"}, "parallel.strategy=ddp"),
    ({"FSDP_SHARDING_STRATEGY": "HYBRID_SHARD"}, "HYBRID_SHARD"),
    ({"FSDP_ACTIVATION_CHECKPOINTING": "true"}, "FSDP_ACTIVATION_CHECKPOINTING"),
    ({"FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP"}, "FSDP_AUTO_WRAP_POLICY"),
    ({"FSDP_BACKWARD_PREFETCH": "NO_PREFETCH"}, "FSDP_BACKWARD_PREFETCH"),
    ({"FSDP_OFFLOAD_PARAMS": "maybe"}, "FSDP_OFFLOAD_PARAMS"),
])
def test_accelerate_fsdp_settings_we_cannot_honour_are_refused(extra, named):
    with pytest.raises(ConfigError, match=named):
        launcher_requests({**FSDP_LAUNCH, **extra})


def test_accelerate_deepspeed_settings_are_honoured_or_refused(tmp_path):
    conf = tmp_path / "ds.json"
    conf.write_text(json.dumps(default_config(1)))
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
           "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "2", "ACCELERATE_GRADIENT_CLIPPING": "1.0",
           "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "none",
           "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false"}
    cfg = load_config(None, [])
    apply_launcher_requests(cfg, None, [], env)
    ds = cfg.parallel.deepspeed
    assert cfg.parallel.strategy == "deepspeed" and cfg.train.grad_accum == 2
    assert (ds.zero_stage, ds.gradient_clipping, ds.offload_optimizer, ds.offload_param) == (3, 1.0, "cpu", "none")
    cfg = load_config(None, [])
    apply_launcher_requests(cfg, None, [], {"ACCELERATE_USE_DEEPSPEED": "true",
                                            "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(conf)})
    assert cfg.parallel.deepspeed.config == str(conf)
    # the command line and accelerate disagree: say so
    with pytest.raises(ConfigError, match="parallel.deepspeed.zero_stage"):
        apply_launcher_requests(load_config(None, ["parallel.deepspeed.zero_stage=1"]), None,
                                ["parallel.deepspeed.zero_stage=1"], env)
    for bad, named in ((("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "nvme"), "nvme"),
                       (("ACCELERATE_DEEPSPEED_ZERO3_INIT", "true"), "zero3_init_flag"),
                       (("ACCELERATE_DEEPSPEED_ZERO_STAGE", "5"), "zero_stage"),
                       (("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(tmp_path / "nope.json")), "no such file")):
        with pytest.raises(ConfigError, match=named):
            apply_launcher_requests(load_config(None, []), None, [], {**env, bad[0]: bad[1]})
