"""gan_dist's FID, KID, IS and precision/recall equal torch-fidelity's own `calculate_metrics` on
the same image folders and the same weight files (random ones in the published layouts: offline),
at image sizes 32 (resized) and 299 (not). Same seeds: KID's subsets and IS's splits are the reference's."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gan_dist.metrics.evaluation import build_extractors, evaluate_images, plan_metrics
from gan_dist.metrics.sources import FolderSource
from tests._metric_weights import write_inception, write_vgg16

pytestmark = pytest.mark.timeout(900)
N = 12  # per set: at least IS's 10 splits; small, as the networks run at ~1 image/s on this CPU
KID = dict(kid_subsets=4, kid_subset_size=8)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("weights")
    return {"inception": write_inception(folder), "vgg16": write_vgg16(folder)}


def write_set(folder: Path, size: int, seed: int, shift: float, gray: int = 0) -> Path:
    """Smooth random images (blobs on gradients), `gray` of them grayscale; `shift` moves the set."""
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(N):
        img = np.zeros((size, size, 3))
        for c in range(3):
            cx, cy, r = rng.uniform(0.2, 0.8, 3)
            img[..., c] = 0.5 * (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) + shift
            img[..., c] += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (0.05 + 0.1 * r))
        u8 = (np.clip(img, 0, 1.5) / 1.5 * 255).round().astype(np.uint8)
        pil = Image.fromarray(u8[..., 0], "L") if i < gray else Image.fromarray(u8, "RGB")
        pil.save(folder / f"{i:03d}.png")
    return folder


def reference_metrics(fake: Path, real: Path, weights: dict[str, Path], pr: bool, monkeypatch) -> dict:
    """torch-fidelity's numbers; its torch.load of the weight file is made weights_only=True."""
    import torch_fidelity

    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: load(*a, **{**k, "weights_only": True}))
    common = dict(input1=str(fake), input2=str(real), cuda=False, cache=False, verbose=False, batch_size=N,
                  save_cpu_ram=True)  # no loader workers on this 2-core machine
    out = torch_fidelity.calculate_metrics(**common, fid=True, kid=True, isc=True, isc_splits=10,
                                           feature_extractor_weights_path=str(weights["inception"]), **KID)
    if pr:
        out.update(torch_fidelity.calculate_metrics(**common, prc=True, feature_extractor="vgg16",
                                                    feature_extractor_weights_path=str(weights["vgg16"])))
    return out


# 32 px: resized to the networks' input (64 px took the same path); 299 px: no resize
@pytest.mark.parametrize("size,pr", [(32, True), pytest.param(299, False, marks=pytest.mark.slow)])
def test_metrics_equal_torch_fidelity(size, pr, weights, tmp_path, monkeypatch):
    real = write_set(tmp_path / "real", size, seed=1, shift=0.0)
    fake = write_set(tmp_path / "fake", size, seed=2, shift=0.3, gray=2)
    monkeypatch.setenv("GAN_DIST_CACHE", str(tmp_path / "cache"))
    plan = plan_metrics(["fid", "kid", "is", *(["pr"] if pr else [])])
    extractors = build_extractors(plan, torch.device("cpu"), type("E", (), {
        "inception_weights": str(weights["inception"]), "vgg16_weights": str(weights["vgg16"])})())
    ours = evaluate_images(FolderSource(real), FolderSource(fake), plan, extractors, n=None, batch_size=5,
                           log=lambda m: None, **KID)
    ref = reference_metrics(fake, real, weights, pr, monkeypatch)
    print("ours", ours, "\nreference", ref)
    assert ours["num_fake"] == ours["num_real"] == N
    assert ours["fid"] > 0.1 and ours["is"] > 1.001  # numbers, not rounding residues
    assert ours["fid"] == pytest.approx(ref["frechet_inception_distance"], rel=1e-3)
    assert ours["is"] == pytest.approx(ref["inception_score_mean"], rel=1e-3)
    assert ours["is"] - 1 == pytest.approx(ref["inception_score_mean"] - 1, rel=1e-3)  # IS >= 1: compare the excess
    assert ours["is_std"] == pytest.approx(ref["inception_score_std"], rel=1e-2, abs=1e-4)
    # the same subsets: equal up to the reference's float32 kernel sums (far inside its spread)
    assert abs(ours["kid"] - ref["kernel_inception_distance_mean"]) <= 1e-3 * abs(ref["kernel_inception_distance_mean"]) \
        + 0.01 * ref["kernel_inception_distance_std"]
    assert ours["kid_std"] == pytest.approx(ref["kernel_inception_distance_std"], rel=1e-2)
    if pr:
        assert ours["precision"] == ref["precision"] and ours["recall"] == ref["recall"]
    assert any("gray" in note for note in ours["notes"])
