"""Metrics of a class-conditional generator, class by class.

    intra_fd            the mean over classes of the Frechet distance between the generated
                        images of class k and the real images of class k (intra-class FD, as
                        in Miyato & Koyama 2018), in the evaluation network's feature space;
                        intra_fd/<k> per class
    class_accuracy      on the digits: the share of generated images of class k that the
                        bundled digits classifier assigns to k, averaged over the classes;
                        class_accuracy/<k> per class

The real images are read with their `.cls` labels from the training shards and embedded once
per evaluator. Generated sample i of class k has the latent `latents(k * n + i)` of the
evaluation seed, so the numbers of two evaluations (or two runs) compare the same latents.
Every rank computes the same numbers (the generator is called identically on all of them,
which a sharded generator needs); the class-wise sets are small (eval.num_samples / classes).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from gan_dist.metrics.frechet import feature_stats, frechet_distance
from gan_dist.metrics.shares import latents

GenerateC = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z, classes) -> images in [-1, 1]


def labelled_images(urls: Sequence[str], channels: int, resolution: int,
                    limit: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, C, R, R) images of the shards with their labels (N,); samples without a usable
    label or image are left out."""
    from gan_dist.data.decode import BadSample, decode_label, decode_sample
    from gan_dist.data.tario import iter_samples, open_shard, shard_size

    images, labels = [], []
    for url in urls:
        with open_shard(url) as stream:
            for _, _, members in iter_samples(stream, size=shard_size(url, stream)):
                try:
                    img, label = decode_sample(members, channels, resolution), decode_label(members)
                except BadSample:
                    continue
                images.append(torch.from_numpy(np.array(img, dtype=np.uint8)))
                labels.append(label)
                if limit and len(images) >= limit:
                    return torch.stack(images), torch.tensor(labels)
    if not images:
        from gan_dist.data import DataError
        raise DataError(f"data: no labelled sample in {urls[0]!r}...: per-class metrics need .cls labels")
    return torch.stack(images), torch.tensor(labels)


class ClassEvaluator:
    """Intra-class FD (and, with the digits classifier, class accuracy) of a conditional G."""

    def __init__(self, extractor: Any, real_images: torch.Tensor, real_labels: torch.Tensor,
                 num_classes: int, per_class: int, z_dim: int, batch_size: int = 250,
                 seed: int = 20_240_601, classes: Optional[Sequence[int]] = None) -> None:
        self.extractor, self.num_classes, self.per_class = extractor, num_classes, per_class
        self.z_dim, self.batch_size, self.seed = z_dim, batch_size, seed
        self.classes = list(range(num_classes)) if classes is None else list(classes)
        feats = self._embed(real_images.float().div(127.5).sub(1.0))
        self.real = {k: feats[real_labels == k] for k in self.classes}

    def _embed(self, images: torch.Tensor, key: str = "features") -> torch.Tensor:
        out = [self.extractor(images[i:i + self.batch_size])[key].cpu() for i in range(0, len(images), self.batch_size)]
        return torch.cat(out)

    @torch.no_grad()
    def generated(self, generate: GenerateC, k: int, device: Optional[torch.device] = None) -> dict[str, torch.Tensor]:
        """The extractor's outputs of `per_class` generated images of class k."""
        acc: dict[str, list[torch.Tensor]] = {}
        z_all = latents(k * self.per_class, (k + 1) * self.per_class, self.z_dim, self.seed)
        for i in range(0, self.per_class, self.batch_size):
            z = z_all[i:i + self.batch_size]
            z = z.to(device) if device is not None else z
            c = torch.full((len(z),), k, dtype=torch.long, device=z.device)
            for key, value in self.extractor(generate(z, c)).items():
                acc.setdefault(key, []).append(value.float().cpu())
        return {key: torch.cat(v) for key, v in acc.items()}

    def run(self, generate: GenerateC, device: Optional[torch.device] = None) -> dict[str, float]:
        out: dict[str, float] = {}
        fds, accs = [], []
        for k in self.classes:
            fake = self.generated(generate, k, device)
            x = fake["features"].double().numpy()
            real = self.real[k].double().numpy()
            if len(real) >= 2 and np.isfinite(x).all():
                fd = frechet_distance(*feature_stats(x), *feature_stats(real))
            else:
                fd = float("nan")
            out[f"intra_fd/{k}"] = fd
            fds.append(fd)
            if "probs" in fake:  # the digits classifier: does G make the digit it was asked for?
                acc = float((fake["probs"].argmax(dim=1) == k).float().mean())
                out[f"class_accuracy/{k}"] = acc
                accs.append(acc)
        out["intra_fd"] = float(np.mean(fds)) if fds else float("nan")
        if accs:
            out["class_accuracy"] = float(np.mean(accs))
        return out


def class_evaluator(cfg: Any, urls: Sequence[str], extractor: Any, num_classes: int, z_dim: int) -> ClassEvaluator:
    """The per-class evaluator of a conditional training run: eval.num_samples split over the
    classes, the real images of the training shards (at most eval.reference_images)."""
    m, e = cfg.model, cfg.eval
    images, labels = labelled_images(urls, m.channels, m.resolution, e.reference_images or None)
    return ClassEvaluator(extractor, images, labels, num_classes, max(2, e.num_samples // num_classes), z_dim,
                          e.batch_size)


__all__ = ["ClassEvaluator", "class_evaluator", "labelled_images"]
