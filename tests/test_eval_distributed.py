"""Distributed evaluation with 2 real gloo processes: exactly N samples, gathered in order,
equal to the one-process result; reference statistics computed by several ranks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gan_dist.metrics.shares import latents
from tests._mp import PYTHON, REPO, base_env, run, run_ranks

WORKER = str(REPO / "tests" / "workers" / "eval_gather_worker.py")
PER_RANK = str(REPO / "tests" / "workers" / "per_rank.py")
pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(400)]


def job(tmp_path, world_size: int, name: str, *args: str, env: dict | None = None) -> dict:
    out = tmp_path / f"{name}.pt"
    if world_size == 1:
        run([PYTHON, WORKER, "--out", str(out), *args], timeout=300, env=base_env(**(env or {})))
    else:
        run_ranks([WORKER, "--out", str(out), *args], world_size, timeout=300, extra_env=env)
    return torch.load(out, weights_only=True)


def test_two_ranks_gather_exactly_n_samples_in_order(tmp_path):
    ns = [37, 1, 2, 40]  # not divisible by 2, fewer samples than ranks, divisible, several batches
    two = job(tmp_path, 2, "two", "--mode", "identity", "--batch", "5", "--n", *map(str, ns))
    one = job(tmp_path, 1, "one", "--mode", "identity", "--batch", "5", "--n", *map(str, ns))
    assert two["world_size"] == 2 and one["world_size"] == 1
    for n in ns:
        feats = two[n]["features"]
        assert feats.shape == (n, 16)
        # the features are the latents: sample i is latent i, each exactly once, in index order
        assert torch.equal(feats, latents(0, n, 16, seed=7)), f"n={n}"
        assert torch.equal(feats, one[n]["features"]), f"n={n}"
        assert len({tuple(r.tolist()) for r in feats}) == n
    # rank 0 ran ceil(ceil(37 / 2) / 5) = 4 batches of 5, 5, 5, 4 (the other rank the same sizes)
    assert two[37]["calls"] == [5, 5, 5, 4]
    assert one[37]["calls"] == [5] * 7 + [2]


def test_two_ranks_digits_features_equal_one_process(tmp_path):
    two = job(tmp_path, 2, "two", "--mode", "digits", "--batch", "8", "--n", "45")
    one = job(tmp_path, 1, "one", "--mode", "digits", "--batch", "8", "--n", "45")
    f2, f1 = two[45]["features"], one[45]["features"]
    assert f2.shape == f1.shape == (45, 128)
    torch.testing.assert_close(f2, f1, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(two[45]["probs"], one[45]["probs"], rtol=1e-4, atol=1e-5)
    assert torch.allclose(two[45]["probs"].sum(1), torch.ones(45))


def test_reference_statistics_from_two_ranks_equal_one_process_and_are_cached(tmp_path):
    two = job(tmp_path, 2, "two", "--mode", "reference", env={"GAN_DIST_CACHE": str(tmp_path / "c2")})
    one = job(tmp_path, 1, "one", "--mode", "reference", env={"GAN_DIST_CACHE": str(tmp_path / "c1")})
    r2, r1 = two["reference"], one["reference"]
    assert r2["n"] == r1["n"] == 1797  # every demo image once
    np.testing.assert_allclose(r2["mu"].numpy(), r1["mu"].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r2["sigma"].numpy(), r1["sigma"].numpy(), rtol=1e-4, atol=1e-5)
    # cached next to the demo shards
    assert r2["path"].startswith(str(tmp_path / "c2")) and r2["path"].endswith(".npz")
    stamp = Path(r2["path"]).stat().st_mtime_ns
    again = job(tmp_path, 2, "again", "--mode", "reference", env={"GAN_DIST_CACHE": str(tmp_path / "c2")})
    assert again["reference"]["path"] == r2["path"]
    assert Path(r2["path"]).stat().st_mtime_ns == stamp  # read, not recomputed
    assert torch.equal(again["reference"]["mu"], r2["mu"])
