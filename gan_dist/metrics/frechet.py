"""Distances between feature distributions: Frechet distance (FID-style) and KID.

All arithmetic is float64 NumPy. Features usually come out of a torch extractor in
float32; summing a few thousand outer products in float32 loses the digits that FD
depends on (it is a difference of large traces), so everything is promoted first.
"""

from __future__ import annotations

from typing import Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]


def as_float64_matrix(features: ArrayLike, name: str = "features") -> np.ndarray:
    """(N, D) float64 array from a tensor or array; N x D is the only layout metrics accept."""
    if isinstance(features, torch.Tensor):
        features = features.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(features, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (num_samples, feature_dim) array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf; the extractor or the generator diverged")
    return arr


def feature_stats(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (float64) of N x D features: the Gaussian FD compares."""
    x = as_float64_matrix(features)
    if x.shape[0] < 2:
        raise ValueError(f"feature_stats needs at least 2 samples to estimate a covariance, got {x.shape[0]}")
    mu = x.mean(axis=0)
    sigma = np.cov(x, rowvar=False)
    return mu, np.atleast_2d(sigma)


def _psd_eigenvalues_clean(w: np.ndarray) -> np.ndarray:
    """Zero the eigenvalues that rounding cannot tell from 0 (numerical rank cutoff).

    eigh's absolute error is about eps * max|w| per eigenvalue; the square root would turn
    such 1e-14 noise into 1e-7 contributions that add up over many null directions.
    """
    tol = np.abs(w).max(initial=0.0) * w.shape[0] * np.finfo(np.float64).eps
    return np.where(w > tol, w, 0.0)


def _sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix, exact on its numerical null space."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(_psd_eigenvalues_clean(w))) @ v.T


def _check_stats(mu: ArrayLike, sigma: ArrayLike, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.asarray(mu.detach().cpu() if isinstance(mu, torch.Tensor) else mu, dtype=np.float64).reshape(-1)
    sigma = np.atleast_2d(
        np.asarray(sigma.detach().cpu() if isinstance(sigma, torch.Tensor) else sigma, dtype=np.float64)
    )
    d = mu.shape[0]
    if sigma.shape != (d, d):
        raise ValueError(f"{name}: covariance shape {sigma.shape} does not match mean of dimension {d}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{name}: statistics contain NaN or inf")
    return mu, sigma


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).
    tr((S1 S2)^(1/2)) equals the sum of square roots of the eigenvalues of the symmetric PSD
    matrix S1^(1/2) S2 S1^(1/2), which eigh computes stably even when the covariances are
    singular (more dimensions than samples, dead ReLU units): no epsilon offset and no
    complex parts to discard, unlike scipy.linalg.sqrtm of the non-symmetric product.
    """
    mu1, sigma1 = _check_stats(mu1, sigma1, "first distribution")
    mu2, sigma2 = _check_stats(mu2, sigma2, "second distribution")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    # Symmetrise: covariances loaded from disk or reduced across ranks may be off by rounding.
    sigma1 = 0.5 * (sigma1 + sigma1.T)
    sigma2 = 0.5 * (sigma2 + sigma2.T)
    root1 = _sqrt_psd(sigma1)
    inner = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh(0.5 * (inner + inner.T))
    tr_covmean = np.sqrt(_psd_eigenvalues_clean(eig)).sum()
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
    # The exact value is >= 0; rounding on identical statistics can give -1e-13.
    return max(fd, 0.0)


def frechet_distance_from_features(features1: ArrayLike, features2: ArrayLike) -> float:
    """FD between the Gaussians fitted to two feature sets."""
    return frechet_distance(*feature_stats(features1), *feature_stats(features2))


def mmd2_unbiased(x: ArrayLike, y: ArrayLike) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel k(a, b) = (a.b / dim + 1)^3.

    Within-set sums drop the diagonal (i != j); the cross term averages all m x n pairs,
    as in the reference KID implementations. Unbiased, so it can be slightly negative.
    """
    x = as_float64_matrix(x, "x")
    y = as_float64_matrix(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"MMD needs at least 2 samples per set, got {m} and {n}")
    dim = x.shape[1]
    kxx = (x @ x.T / dim + 1.0) ** 3
    kyy = (y @ y.T / dim + 1.0) ** 3
    kxy = (x @ y.T / dim + 1.0) ** 3
    term_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    term_y = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(term_x + term_y - 2.0 * kxy.mean())


def kernel_inception_distance(
    features1: ArrayLike,
    features2: ArrayLike,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID: mean and standard deviation of unbiased MMD^2 over random equal-size subsets.

    Subsets of min(subset_size, N1, N2) samples are drawn without replacement from each
    set, in the reference implementations' order (a legacy NumPy RandomState of `seed`, one
    draw from the first set then one from the second per subset): the same seed on the same
    features gives torch-fidelity's subsets, and repeated evaluations agree.
    """
    x = as_float64_matrix(features1, "features1")
    y = as_float64_matrix(features2, "features2")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2:
        raise ValueError(f"KID needs subsets of at least 2 samples; sets have {x.shape[0]} and {y.shape[0]}")
    rng = np.random.RandomState(seed)
    subsets = [(rng.choice(x.shape[0], m, replace=False), rng.choice(y.shape[0], m, replace=False))
               for _ in range(num_subsets)]
    n_x, n_y = x.shape[0], y.shape[0]
    if num_subsets * m * m > n_x * n_x + n_y * n_y + n_x * n_y and (n_x + n_y) ** 2 <= KERNEL_CACHE_MAX:
        values = _mmd2_subsets_from_kernels(x, y, subsets)
    else:
        values = np.array([mmd2_unbiased(x[ix], y[iy]) for ix, iy in subsets], dtype=np.float64)
    return float(values.mean()), float(values.std())


KERNEL_CACHE_MAX = 25_000_000  # kernel entries (200 MB of float64) computed once for all KID subsets


def _mmd2_subsets_from_kernels(x: np.ndarray, y: np.ndarray, subsets: list) -> np.ndarray:
    """mmd2_unbiased of every subset pair, from the full kernel matrices computed once.

    A subset's kernel sum is w^T K v with 0/1 indicator vectors w, v; stacking the indicators
    of all subsets turns the work into three matrix products.
    """
    dim = x.shape[1]

    def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        k = a @ b.T / dim + 1.0
        return k * k * k

    m = len(subsets[0][0])
    wx = np.zeros((len(subsets), x.shape[0]))
    wy = np.zeros((len(subsets), y.shape[0]))
    for i, (ix, iy) in enumerate(subsets):
        wx[i, ix] = 1.0
        wy[i, iy] = 1.0
    kxx, kyy = kernel(x, x), kernel(y, y)
    sum_xx = np.einsum("sn,sn->s", wx @ kxx, wx) - wx @ np.diag(kxx)
    sum_yy = np.einsum("sn,sn->s", wy @ kyy, wy) - wy @ np.diag(kyy)
    del kxx, kyy
    sum_xy = np.einsum("sn,sn->s", wx @ kernel(x, y), wy)
    return (sum_xx + sum_yy) / (m * (m - 1)) - 2.0 * sum_xy / (m * m)
