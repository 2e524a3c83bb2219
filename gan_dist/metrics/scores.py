"""Inception Score and precision/recall: the metrics that need more than feature statistics.

Both follow the reference implementations' definitions exactly (torch-fidelity's, which
Salimans et al.'s and Kynkaanniemi et al.'s code also define), so that the same features give
the same numbers: IS over 10 splits of the seeded-shuffled samples, in float64; precision and
recall with k-nearest-neighbour balls (k = 3) on float32 Euclidean distances.
"""
from __future__ import annotations

import numpy as np
import torch

IS_SPLITS = 10
SHUFFLE_SEED = 2020  # torch-fidelity's default rng_seed: the same splits as its IS and KID
PR_NEIGHBOURS = 3
PR_BLOCK = 10_000  # rows x columns of one distance block (the reference's batch size)


def inception_score(logits: torch.Tensor, splits: int = IS_SPLITS, seed: int = SHUFFLE_SEED) -> tuple[float, float]:
    """Mean and standard deviation over `splits` parts of exp(E_x KL(p(y|x) || p(y))).

    The samples are shuffled with a seeded permutation first, so the parts do not follow the
    order in which a generator or a folder produced them.
    """
    if logits.ndim != 2 or len(logits) < splits:
        raise ValueError(f"the Inception Score needs at least {splits} samples (one per split), got {len(logits)}")
    n = len(logits)
    x = logits.detach().cpu()[torch.from_numpy(np.random.RandomState(seed).permutation(n))].double()
    p, log_p = x.softmax(dim=1), x.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        q = p[lo:hi].mean(dim=0, keepdim=True)
        scores.append(float((p[lo:hi] * (log_p[lo:hi] - q.log())).sum(dim=1).mean().exp()))
    return float(np.mean(scores)), float(np.std(scores))


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.cdist(a, part) for part in b.split(PR_BLOCK)], dim=1)


def _radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of every row of x to its k-th nearest other row (the row itself is at 0)."""
    return torch.cat([_distances(part, x).kthvalue(k + 1, dim=1).values for part in x.split(PR_BLOCK)])


def _covered(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """For every point: whether it lies in the ball of at least one centre."""
    return torch.cat([(_distances(part, centres) <= radii).any(dim=1) for part in points.split(PR_BLOCK)])


def precision_recall(fake: torch.Tensor, real: torch.Tensor, k: int = PR_NEIGHBOURS) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019).

    Precision: the share of generated samples inside the k-NN ball of some real sample (the real
    manifold). Recall: the share of real samples inside the k-NN ball of some generated one.
    """
    fake, real = fake.detach().cpu().float(), real.detach().cpu().float()
    if min(len(fake), len(real)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set, "
                         f"got {len(fake)} generated and {len(real)} real")
    precision = _covered(fake, real, _radii(real, k)).float().mean().item()
    recall = _covered(real, fake, _radii(fake, k)).float().mean().item()
    return precision, recall
