"""Evaluation during training (TensorBoard, metrics.jsonl, run_info.json) and
`python -m gan_dist.evaluate` (one JSON line; the same numbers in one and two processes)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests._mp import PYTHON, REPO, base_env, run, run_ranks
from tests.conftest import TINY

pytestmark = pytest.mark.timeout(400)
EVALUATE = ["-m", "gan_dist.evaluate"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    run([PYTHON, "-m", "gan_dist.train", *TINY, f"run.dir={run_dir}", "eval.enabled=true", "eval.every=2",
         "eval.num_samples=64", "eval.batch_size=20", "eval.kid_subsets=5", "train.keep_best=true"], timeout=300,
        cwd=REPO)
    return run_dir


def evaluate(*args: str, ranks: int = 1) -> dict:
    if ranks == 1:
        out = run([PYTHON, *EVALUATE, *args], timeout=240, cwd=REPO).stdout
    else:
        out = run_ranks([*EVALUATE, *args], ranks, timeout=240, cwd=REPO)[0].stdout
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    return json.loads(lines[0])


def test_training_evaluates_at_start_every_n_steps_and_at_the_end(trained):
    lines = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 2, 4]
    for x in lines:
        assert x["extractor"] == "digits" and x["num_samples"] == 64 and x["reference_images"] == 1797
        assert x["digits_fd"] > 0 and 0 <= x["class_coverage"] <= 10
    info = json.loads((trained / "run_info.json").read_text())
    assert info["eval"] == lines[-1] and info["ema"] is True
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(trained / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("metrics/digits_fd", "metrics/kid", "metrics/class_coverage"):
        assert tag in tags
    fd = acc.Scalars("metrics/digits_fd")
    assert [e.step for e in fd] == [0, 2, 4]
    assert fd[-1].value == pytest.approx(lines[-1]["digits_fd"], rel=1e-6)


def test_evaluate_cli_prints_one_json_line_matching_the_training_evaluation(trained):
    out = evaluate("--ckpt", str(trained), "eval.kid_subsets=5")
    assert out["ema"] is True and out["weights"].endswith("generator_ema.pt") and out["step"] == 4
    final = json.loads((trained / "run_info.json").read_text())["eval"]
    # same generator, same latents, same reference: the same number as at the end of training
    assert out["num_samples"] == 64
    assert out["digits_fd"] == pytest.approx(final["digits_fd"], rel=1e-6)
    assert out["class_coverage"] == final["class_coverage"]


def test_keep_best_keeps_the_generator_of_the_lowest_fd(trained):
    lines = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    best = json.loads((trained / "best" / "best.json").read_text())
    assert best["metric"] == "digits_fd"
    assert best["digits_fd"] == min(x["digits_fd"] for x in lines)
    assert best["step"] == min(lines, key=lambda x: x["digits_fd"])["step"]
    again = evaluate("--ckpt", str(trained / "best"), "eval.kid_subsets=5")
    assert again["ema"] is True and again["digits_fd"] == pytest.approx(best["digits_fd"], rel=1e-6)


def test_evaluate_with_two_processes_equals_one_process(trained):
    one = evaluate("--ckpt", str(trained), "--n", "33", "eval.kid_subsets=5")
    two = evaluate("--ckpt", str(trained), "--n", "33", "eval.kid_subsets=5", ranks=2)
    assert two["world_size"] == 2 and one["world_size"] == 1 and two["num_samples"] == one["num_samples"] == 33
    assert two["digits_fd"] == pytest.approx(one["digits_fd"], rel=1e-4)
    assert two["kid"] == pytest.approx(one["kid"], rel=1e-3, abs=1e-4)
    assert two["class_coverage"] == one["class_coverage"]


def test_evaluate_a_checkpoint_and_the_training_weights(trained):
    ckpt = sorted((trained / "checkpoints").glob("step*"))[-1]
    from_ckpt = evaluate("--ckpt", str(ckpt), "eval.kid_subsets=5")
    from_run = evaluate("--ckpt", str(trained), "eval.kid_subsets=5")
    assert from_ckpt["ema"] is True and from_ckpt["digits_fd"] == pytest.approx(from_run["digits_fd"], rel=1e-9)
    raw = evaluate("--ckpt", str(trained), "--no-ema", "eval.kid_subsets=5")
    assert raw["ema"] is False and raw["weights"].endswith("generator.pt")


def test_evaluate_errors_are_clear(trained, tmp_path):
    res = run([PYTHON, *EVALUATE, "--ckpt", str(tmp_path / "none")], timeout=120, cwd=REPO, check=False)
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr
    env = base_env(TORCH_HOME=str(tmp_path / "th"))
    env.pop("GAN_DIST_INCEPTION_WEIGHTS", None)
    res = run([PYTHON, *EVALUATE, "--ckpt", str(trained), "eval.extractor=inception"], timeout=120, cwd=REPO,
              env=env, check=False)
    assert res.returncode == 2 and "GAN_DIST_INCEPTION_WEIGHTS" in res.stderr and "Traceback" not in res.stderr
    res = run([PYTHON, *EVALUATE, "--ckpt", str(trained), "eval.bogus=1"], timeout=120, cwd=REPO, check=False)
    assert res.returncode == 2 and "eval.bogus" in res.stderr


def test_evaluation_does_not_change_training(trained, tmp_path):
    """Evaluating draws its own latents and restores G exactly: the trained weights are those
    of a run that never evaluated."""
    import hashlib

    quiet = tmp_path / "quiet"
    run([PYTHON, "-m", "gan_dist.train", *TINY, f"run.dir={quiet}", "eval.enabled=false"], timeout=300, cwd=REPO)
    assert not (quiet / "metrics.jsonl").exists()
    for name in ("generator.pt", "generator_ema.pt"):
        assert hashlib.sha256((quiet / name).read_bytes()).digest() == \
            hashlib.sha256((trained / name).read_bytes()).digest(), name


# ---- two image sets: --real / --fake ---------------------------------------------------------------
def demo_shard_dir() -> Path:
    from gan_dist.data.demo import ensure_demo_shards

    return Path(ensure_demo_shards()[0]).parent


@pytest.fixture(scope="module")
def fake_pngs(trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fake") / "pngs"
    run([PYTHON, "-m", "gan_dist.generate", "--ckpt", str(trained), "--n", "40", "--out", str(out)], timeout=240,
        cwd=REPO)
    return out


def test_folder_and_run_as_fake_give_the_same_numbers_in_one_and_two_processes(trained, fake_pngs):
    real = str(demo_shard_dir())
    args = ["--real", real, "--metrics", "digits_fd,kid", "eval.kid_subsets=5", "--seed", "0"]
    folder = evaluate(*args, "--fake", str(fake_pngs), "--n", "33")
    folder2 = evaluate(*args, "--fake", str(fake_pngs), "--n", "33", ranks=2)
    gen = evaluate(*args, "--fake", str(trained), "--n", "33")
    gen2 = evaluate(*args, "--fake", str(trained), "--n", "33", ranks=2)
    for out in (folder, folder2, gen, gen2):
        assert out["num_fake"] == 33 and out["num_real"] == 1797 and out["metrics"] == ["digits_fd", "kid"]
    assert folder2["world_size"] == gen2["world_size"] == 2
    # the PNGs are generate's samples 0..32 with seed 0: the same images as generating them here,
    # up to the 8-bit rounding of the PNG files
    assert gen["digits_fd"] == pytest.approx(gen2["digits_fd"], rel=1e-4)
    assert folder["digits_fd"] == pytest.approx(folder2["digits_fd"], rel=1e-4)
    assert folder["digits_fd"] == pytest.approx(gen["digits_fd"], rel=0.05)
    assert folder2["kid"] == pytest.approx(folder["kid"], rel=1e-3, abs=1e-4)
    every = evaluate(*args, "--fake", str(fake_pngs), "--n", "all")
    assert every["num_fake"] == 40


def test_folder_cli_with_the_inception_network_prints_json_and_a_table(fake_pngs, tmp_path):
    from tests._metric_weights import write_inception

    weights = write_inception(tmp_path)
    real = tmp_path / "real"
    real.mkdir()
    for p in sorted(fake_pngs.iterdir())[30:40]:
        (real / p.name).write_bytes(p.read_bytes())
    env = base_env(GAN_DIST_INCEPTION_WEIGHTS=str(weights))
    res = run([PYTHON, *EVALUATE, "--real", str(real), "--fake", str(fake_pngs), "--n", "10",
               "--metrics", "fid,kid,is", "eval.kid_subsets=3"], timeout=400, cwd=REPO, env=env)
    out = json.loads(res.stdout.strip())
    assert out["num_fake"] == out["num_real"] == 10 and out["fid"] > 0 and out["is"] >= 1.0
    assert out["networks"]["inception"].startswith("inception-")
    assert any("gray images repeated to RGB" in note for note in out["notes"])
    assert "fid" in res.stderr and "is_std" in res.stderr  # the table


def test_folder_cli_errors_are_clear(fake_pngs, tmp_path):
    real = str(demo_shard_dir())
    res = run([PYTHON, *EVALUATE, "--real", real, "--fake", str(fake_pngs), "--n", "41", "--metrics", "digits_fd"],
              timeout=120, cwd=REPO, check=False)
    assert res.returncode == 2 and "fewer than --n 41" in res.stderr and "--n all" in res.stderr
    assert "Traceback" not in res.stderr
    res = run([PYTHON, *EVALUATE, "--real", str(tmp_path / "nothing"), "--fake", str(fake_pngs), "--n", "5",
               "--metrics", "digits_fd"], timeout=120, cwd=REPO, check=False)
    assert res.returncode == 2 and "nothing" in res.stderr and "Traceback" not in res.stderr
    env = base_env(TORCH_HOME=str(tmp_path / "th"))
    env.pop("GAN_DIST_INCEPTION_WEIGHTS", None)
    res = run([PYTHON, *EVALUATE, "--real", real, "--fake", str(fake_pngs), "--n", "5", "--metrics", "fid"],
              timeout=120, cwd=REPO, env=env, check=False)
    assert res.returncode == 2 and "weights-inception-2015-12-05-6726825d.pth" in res.stderr
    res = run([PYTHON, *EVALUATE, "--real", real, "--fake", str(fake_pngs), "--n", "5", "--metrics", "fid,xyz"],
              timeout=120, cwd=REPO, check=False)
    assert res.returncode == 2 and "--metrics" in res.stderr and "xyz" in res.stderr
