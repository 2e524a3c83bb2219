"""User mistakes around the sharded strategies end in one clear message and exit code 2."""
from __future__ import annotations

import pytest

from tests._mp import PYTHON, base_env, run

TINY = ["model.dcgan.ngf=8", "model.dcgan.ndf=8", "model.dcgan.nz=16", "train.batch_size=8", "data.num_workers=0",
        "run.threads=1", "eval.enabled=false", "train.steps=1"]


@pytest.fixture
def without_deepspeed(tmp_path):
    """An environment where `import deepspeed` fails as if the package were not installed."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['deepspeed'] = None  # import raises\n")
    env = base_env()
    env["PYTHONPATH"] = f"{shim}:{env['PYTHONPATH']}"
    check = run([PYTHON, "-c", "import deepspeed"], env=env, check=False)
    assert check.returncode != 0 and "ModuleNotFoundError" in check.stderr
    return env


def test_gan_dist_imports_without_deepspeed(without_deepspeed):
    code = ("import gan_dist, gan_dist.train, gan_dist.trainer, gan_dist.parallel, gan_dist.parallel.fsdp, "
            "gan_dist.parallel.deepspeed; import sys; print('deepspeed' in sys.modules and sys.modules['deepspeed'])")
    result = run([PYTHON, "-c", code], env=without_deepspeed)
    assert result.stdout.strip() == "None"


def test_missing_deepspeed_names_the_extra_to_install(tmp_path, without_deepspeed):
    result = run([PYTHON, "-m", "gan_dist.train", *TINY, "parallel.strategy=deepspeed", f"run.dir={tmp_path / 'r'}"],
                 env=without_deepspeed, check=False, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert 'pip install "gan_dist[deepspeed]"' in result.stderr
    assert "parallel.strategy=deepspeed" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("override, named", [
    ("parallel.strategy=zero3", "parallel.strategy"),
    ("parallel.deepspeed.config=/nonexistent/ds.json", "parallel.deepspeed.config"),
    ("parallel.deepspeed.zero_stage=4", "parallel.deepspeed.zero_stage"),
    ("parallel.fsdp.reduce_dtype=int8", "parallel.fsdp.reduce_dtype"),
])
def test_bad_strategy_settings_are_named(tmp_path, override, named):
    result = run([PYTHON, "-m", "gan_dist.train", *TINY, override, f"run.dir={tmp_path / 'r'}"],
                 check=False, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert named in result.stderr and "Traceback" not in result.stderr


def test_deepspeed_fp16_where_deepspeed_has_none_is_refused_before_any_work(tmp_path):
    from gan_dist.parallel.deepspeed import fp16_supported

    if fp16_supported():
        pytest.skip("this machine's DeepSpeed accelerator runs fp16 (tests/test_sharded_exact.py trains it)")
    result = run([PYTHON, "-m", "gan_dist.train", *TINY, "parallel.strategy=deepspeed", "train.precision=fp16",
                  f"run.dir={tmp_path / 'r'}"], check=False, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "train.precision=fp16 with parallel.strategy=deepspeed" in result.stderr and "bf16" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()
