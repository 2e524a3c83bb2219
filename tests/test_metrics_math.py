"""Frechet distance, KID, and the offline digits classifier behind the demo metrics."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from gan_dist.metrics import (
    class_coverage,
    digits_fd,
    digits_stats,
    digits_to_tensor_32,
    feature_stats,
    frechet_distance,
    frechet_distance_from_features,
    kernel_inception_distance,
    load_digits_extractor,
    load_digits_split,
    mmd2_unbiased,
)
from gan_dist.metrics.digits import META_PATH, WEIGHTS_PATH, DigitsClassifier


def random_gaussian_stats(rng: np.random.Generator, d: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Stats of n samples of a random correlated Gaussian: realistic, full-rank, anisotropic."""
    mix = rng.standard_normal((d, d)) * rng.uniform(0.1, 2.0, size=d)
    samples = rng.standard_normal((n, d)) @ mix.T + rng.standard_normal(d)
    return feature_stats(samples)


def fd_scipy(mu1, s1, mu2, s2) -> float:
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean.real))


# ---------------------------------------------------------------- Frechet distance


@pytest.mark.parametrize("d", [2, 16, 64])
def test_fd_matches_scipy_sqrtm_on_random_gaussians(d: int) -> None:
    rng = np.random.default_rng(d)
    mu1, s1 = random_gaussian_stats(rng, d, 4 * d + 50)
    mu2, s2 = random_gaussian_stats(rng, d, 4 * d + 50)
    ours = frechet_distance(mu1, s1, mu2, s2)
    ref = fd_scipy(mu1, s1, mu2, s2)
    assert ours > 1.0
    assert ours == pytest.approx(ref, rel=1e-9, abs=1e-9)


def test_fd_closed_form_diagonal_covariances() -> None:
    rng = np.random.default_rng(1)
    d = 10
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    v1, v2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-12)


def test_fd_closed_form_singular_commuting_covariances() -> None:
    # Rank-deficient covariance (fewer samples than dimensions, as with small eval sets):
    # for S2 = c * S1, tr sqrt(S1 S2) = sqrt(c) tr S1, so FD = |dmu|^2 + (1 - sqrt(c))^2 tr S1.
    rng = np.random.default_rng(2)
    d, rank, c = 32, 5, 2.25
    b = rng.standard_normal((d, rank))
    s1 = b @ b.T
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + (1 - np.sqrt(c)) ** 2 * np.trace(s1)
    assert frechet_distance(mu1, s1, mu2, c * s1) == pytest.approx(expected, rel=1e-9)


def test_fd_of_identical_stats_is_zero_even_when_singular() -> None:
    rng = np.random.default_rng(3)
    full = random_gaussian_stats(rng, 16, 200)
    singular = feature_stats(np.maximum(rng.standard_normal((20, 64)), 0))  # 20 samples, 64 dims
    for mu, sigma in (full, singular):
        assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


def test_fd_is_symmetric_and_grows_with_shift() -> None:
    rng = np.random.default_rng(4)
    mu1, s1 = random_gaussian_stats(rng, 8, 100)
    mu2, s2 = random_gaussian_stats(rng, 8, 100)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-10)
    near = frechet_distance(mu1, s1, mu1 + 0.1, s1)
    far = frechet_distance(mu1, s1, mu1 + 1.0, s1)
    assert near == pytest.approx(8 * 0.01, rel=1e-6) and far == pytest.approx(8 * 1.0, rel=1e-6)


def test_feature_stats_promotes_float32_tensors_to_float64() -> None:
    rng = np.random.default_rng(5)
    x64 = rng.standard_normal((300, 6)) * 100 + 1000
    x32 = torch.from_numpy(x64.astype(np.float32))
    mu, sigma = feature_stats(x32)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    ref = x32.double().numpy()
    np.testing.assert_allclose(mu, ref.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(ref, rowvar=False), rtol=1e-10)
    assert frechet_distance_from_features(x32, x32) < 1e-6


def test_fd_rejects_mismatched_or_broken_inputs() -> None:
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="covariance shape"):
        frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        feature_stats(np.full((5, 2), np.nan))
    with pytest.raises(ValueError, match="2-D"):
        feature_stats(np.zeros((5, 2, 2)))


# ---------------------------------------------------------------- KID


def mmd2_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Pair-by-pair loops: the textbook unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3."""
    d = x.shape[1]

    def k(a, b):
        return (float(np.dot(a, b)) / d + 1.0) ** 3

    m, n = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    kxy = sum(k(a, b) for a in x for b in y) / (m * n)
    return kxx + kyy - 2 * kxy


def test_mmd2_matches_slow_reference() -> None:
    rng = np.random.default_rng(6)
    x = rng.standard_normal((7, 5))
    y = rng.standard_normal((9, 5)) + 0.3
    assert mmd2_unbiased(x, y) == pytest.approx(mmd2_reference(x, y), rel=1e-10)


def test_kid_with_full_subsets_equals_reference() -> None:
    # Subsets as large as the sets are permutations of them; MMD^2 does not depend on order.
    rng = np.random.default_rng(7)
    x = rng.standard_normal((12, 4))
    y = rng.standard_normal((12, 4)) * 1.5
    mean, std = kernel_inception_distance(x, y, num_subsets=3, subset_size=100)
    assert mean == pytest.approx(mmd2_reference(x, y), rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_near_zero_for_same_distribution_and_positive_for_shift() -> None:
    rng = np.random.default_rng(8)
    x, y = rng.standard_normal((1000, 16)), rng.standard_normal((1000, 16))
    same, _ = kernel_inception_distance(x, y, num_subsets=20, subset_size=500)
    shifted, _ = kernel_inception_distance(x, y + 0.5, num_subsets=20, subset_size=500)
    assert abs(same) < 0.03
    assert shifted > 0.5
    assert kernel_inception_distance(x, y, 20, 500, seed=1) == kernel_inception_distance(x, y, 20, 500, seed=1)


def test_kid_rejects_tiny_sets() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        kernel_inception_distance(np.zeros((1, 3)), np.zeros((5, 3)))


# ---------------------------------------------------------------- digits conversion


def test_digits_to_tensor_32_maps_range_and_shape() -> None:
    imgs = np.zeros((3, 8, 8))
    imgs[1] = 16
    imgs[2, :, 4:] = 16
    x = digits_to_tensor_32(imgs)
    assert x.shape == (3, 1, 32, 32) and x.dtype == torch.float32
    assert torch.all(x[0] == -1) and torch.all(x[1] == 1)
    assert x[2].min() == -1 and x[2].max() == 1 and 0 < (x[2] > 0).float().mean() < 1
    assert torch.equal(digits_to_tensor_32(imgs.reshape(3, 64)), x)
    with pytest.raises(ValueError, match="0..16"):
        digits_to_tensor_32(imgs + 17)
    with pytest.raises(ValueError, match="shape"):
        digits_to_tensor_32(np.zeros((3, 32, 32)))


# ---------------------------------------------------------------- digits classifier


@pytest.fixture(scope="module")
def split() -> tuple[torch.Tensor, ...]:
    meta = json.loads(META_PATH.read_text())["split"]
    return load_digits_split(meta["test_fraction"], meta["seed"])


@pytest.fixture(scope="module")
def extractor() -> DigitsClassifier:
    return load_digits_extractor("cpu")


def test_committed_weights_are_small_and_reach_stated_accuracy(split, extractor) -> None:
    _, _, x_te, y_te = split
    meta = json.loads(META_PATH.read_text())
    assert WEIGHTS_PATH.stat().st_size < 400_000
    assert meta["test_accuracy"] >= 0.97
    with torch.no_grad():
        acc = (extractor.logits(x_te).argmax(1) == y_te).float().mean().item()
    assert acc >= meta["test_accuracy"] - 0.005
    assert extractor.features(x_te[:4]).shape == (4, meta["arch"]["feature_dim"])


def test_class_coverage_of_real_digits_is_complete(split, extractor) -> None:
    _, _, x_te, y_te = split
    cov = class_coverage(x_te, threshold=0.9, extractor=extractor)
    assert cov.covered == 10
    assert cov.counts.sum() == round(cov.confident_fraction * len(x_te))
    only_three = class_coverage(x_te[y_te == 3], threshold=0.9, extractor=extractor)
    assert only_three.covered <= 2 and only_three.counts.argmax() == 3


def test_digits_fd_separates_real_from_noise(split, extractor) -> None:
    x_tr, _, x_te, _ = split
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(x_te.shape, generator=gen).clamp(-1, 1)
    real_stats = digits_stats(x_tr, extractor)
    fd_real = digits_fd(x_te, real_stats, extractor=extractor)
    fd_noise = digits_fd(noise, real_stats, extractor=extractor)
    assert fd_real * 50 < fd_noise


def test_digits_fd_accepts_images_or_stats(split, extractor) -> None:
    x_tr, _, x_te, _ = split
    ref = x_tr[:300]
    from_stats = digits_fd(x_te[:100], digits_stats(ref, extractor), extractor=extractor)
    assert digits_fd(x_te[:100], ref, extractor=extractor) == pytest.approx(from_stats, rel=1e-9)


def test_extractor_errors_name_the_problem(tmp_path: Path, extractor) -> None:
    with pytest.raises(FileNotFoundError, match="train_digits_classifier.py"):
        load_digits_extractor("cpu", weights=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="N x 1 x 32 x 32"):
        extractor.features(torch.zeros(2, 3, 32, 32))
