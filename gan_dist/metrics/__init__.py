"""Sample-quality metrics: Frechet distance and KID on extractor features, digits metrics."""

from gan_dist.metrics.digits import (
    ClassCoverage,
    DigitsClassifier,
    class_coverage,
    digits_fd,
    digits_features,
    digits_split,
    digits_stats,
    digits_to_tensor_32,
    load_digits_arrays,
    load_digits_extractor,
    load_digits_split,
)
from gan_dist.metrics.frechet import (
    feature_stats,
    frechet_distance,
    frechet_distance_from_features,
    kernel_inception_distance,
    mmd2_unbiased,
)

__all__ = [
    "ClassCoverage",
    "DigitsClassifier",
    "class_coverage",
    "digits_fd",
    "digits_features",
    "digits_split",
    "digits_stats",
    "digits_to_tensor_32",
    "feature_stats",
    "frechet_distance",
    "frechet_distance_from_features",
    "kernel_inception_distance",
    "load_digits_arrays",
    "load_digits_extractor",
    "load_digits_split",
    "mmd2_unbiased",
]
