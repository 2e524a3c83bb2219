"""Sample-quality metrics: Frechet distance and KID on extractor features, digits metrics,
and their distributed evaluation (each rank its share of the samples, gathered on rank 0)."""

from gan_dist.metrics.digits import (
    ClassCoverage,
    DigitsClassifier,
    class_coverage,
    coverage_from_probs,
    digits_fd,
    digits_features,
    digits_split,
    digits_stats,
    digits_to_tensor_32,
    load_digits_arrays,
    load_digits_extractor,
    load_digits_split,
)
from gan_dist.metrics.evaluation import (
    Evaluator,
    Reference,
    build_evaluator,
    dataset_reference,
    generated_features,
    training_evaluator,
)
from gan_dist.metrics.extractors import (
    DigitsExtractor,
    Extractor,
    InceptionExtractor,
    build_extractor,
    resolve_extractor_name,
)
from gan_dist.metrics.frechet import (
    feature_stats,
    frechet_distance,
    frechet_distance_from_features,
    kernel_inception_distance,
    mmd2_unbiased,
)
from gan_dist.metrics.shares import gather_rows, latents, share

__all__ = [
    "ClassCoverage",
    "DigitsClassifier",
    "DigitsExtractor",
    "Evaluator",
    "Extractor",
    "InceptionExtractor",
    "Reference",
    "build_evaluator",
    "build_extractor",
    "class_coverage",
    "coverage_from_probs",
    "dataset_reference",
    "digits_fd",
    "digits_features",
    "digits_split",
    "digits_stats",
    "digits_to_tensor_32",
    "feature_stats",
    "frechet_distance",
    "frechet_distance_from_features",
    "gather_rows",
    "generated_features",
    "kernel_inception_distance",
    "latents",
    "load_digits_arrays",
    "load_digits_extractor",
    "load_digits_split",
    "mmd2_unbiased",
    "resolve_extractor_name",
    "share",
    "training_evaluator",
]
