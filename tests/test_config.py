"""Config: typed schema, YAML + dotted overrides, errors that name the key."""
from __future__ import annotations

import pytest

from gan_dist.config import ConfigError, load_config
from gan_dist.launcher import apply_launcher_requests, launcher_requests
from tests._mp import PYTHON, REPO, run


def test_defaults_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 7\nmodel:\n  dcgan:\n    norm: none\n")
    cfg = load_config(f, ["train.batch_size=3", "run.dir=/tmp/r", "data.urls=[a.tar,b.tar]"])
    assert cfg.train.steps == 7 and cfg.model.dcgan.norm == "none"
    assert cfg.train.batch_size == 3 and cfg.run.dir == "/tmp/r"
    assert cfg.data.urls == ["a.tar", "b.tar"]
    assert load_config().train.precision in ("fp32", "bf16", "fp16")


@pytest.mark.parametrize("override, key", [
    ("train.stepz=3", "train.stepz"),
    ("modle.norm=none", "modle"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.batch_size=abc", "train.batch_size"),
    ("train.precision=fp8", "train.precision"),
    ("model.dcgan.norm=group", "model.dcgan.norm"),
    ("parallel.strategy=horovod", "parallel.strategy"),
    ("train.lr_g=-1", "train.lr_g"),
    ("train.loss=wasserstein", "train.loss"),
    ("reg.r1_gamma=-1", "reg.r1_gamma"),
    ("reg.r2_gamma=-0.5", "reg.r2_gamma"),
    ("reg.d_every=0", "reg.d_every"),
    ("model.resolution=48", "model.resolution"),
    ("model.resolution=big", "model.resolution"),
    ("model.arch=biggan", "model.arch"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override, "model.channels=1"])  # the shape given: the family checks it at once


def test_a_moved_key_says_where_it_lives_now_and_old_run_configs_are_upgraded(tmp_path):
    with pytest.raises(ConfigError, match=r"'model\.ngf'.*now 'model\.dcgan\.ngf'"):
        load_config(None, ["model.ngf=8"])
    old = tmp_path / "config.yaml"  # a run directory's config.yaml from before the model sections
    old.write_text("model:\n  arch: dcgan\n  nz: 16\n  ngf: 8\n  ndf: 8\n  norm: none\n")
    cfg = load_config(old, upgrade=True)
    assert (cfg.model.dcgan.nz, cfg.model.dcgan.ngf, cfg.model.dcgan.norm) == (16, 8, "none")


def test_compile_with_a_penalty_is_refused_before_any_work():
    with pytest.raises(ConfigError, match=r"train\.compile.*reg\.r1_gamma"):
        load_config(None, ["train.compile=true", "reg.r1_gamma=1"])


def test_bad_yaml_file_names_the_file_and_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  steeps: 3\n")
    with pytest.raises(ConfigError, match=r"train\.steeps"):
        load_config(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("override, key", [
    ("train.nope=1", "train.nope"), ("train.batch_size=0", "train.batch_size"),
    ("train.precision=fp8", "train.precision")])
def test_cli_exits_nonzero_naming_the_key_before_any_work(tmp_path, override, key):
    res = run([PYTHON, "-m", "gan_dist.train", override, f"run.dir={tmp_path}/run"], check=False,
              cwd=REPO, timeout=120)
    assert res.returncode == 2
    assert key in res.stderr and "config error" in res.stderr
    assert not (tmp_path / "run").exists()


def test_print_config_lists_keys():
    res = run([PYTHON, "-m", "gan_dist.train", "--print-config", "train.steps=11"], cwd=REPO, timeout=120)
    assert "steps: 11" in res.stdout and "strategy: auto" in res.stdout


def test_accelerate_settings_are_honoured_or_refused():
    env = {"ACCELERATE_MIXED_PRECISION": "fp16", "ACCELERATE_USE_FSDP": "true"}
    assert launcher_requests(env) == {"train.precision": "fp16", "parallel.strategy": "fsdp"}
    assert launcher_requests({"ACCELERATE_MIXED_PRECISION": "no"}) == {}
    cfg = load_config(None, [])
    apply_launcher_requests(cfg, None, [], env)
    assert cfg.train.precision == "fp16" and cfg.parallel.strategy == "fsdp"
    cfg = load_config(None, ["train.precision=bf16"])
    with pytest.raises(ConfigError, match="train.precision"):
        apply_launcher_requests(cfg, None, ["train.precision=bf16"], {"ACCELERATE_MIXED_PRECISION": "fp16"})
    with pytest.raises(ConfigError, match="fp8"):
        apply_launcher_requests(load_config(), None, [], {"ACCELERATE_MIXED_PRECISION": "fp8"})
    with pytest.raises(ConfigError, match="dynamo"):
        apply_launcher_requests(load_config(), None, [], {"ACCELERATE_DYNAMO_BACKEND": "EAGER"})


def test_a_choice_that_yaml_read_as_a_boolean_is_explained():
    with pytest.raises(ConfigError, match=r"train\.matmul_conv='False' is not one of: auto, always, never "
                                          r"\(YAML reads on/off"):
        load_config(None, ["train.matmul_conv=off"])
