"""Measuring instruments (SPEC §3, §6): FID, IS, KID, precision/recall on domain features,
mergeable feature statistics for federated evaluation, classifier read-outs, and exact
metrics for Gaussian-mixture toys."""

from fedscore.metrics.classify import class_accuracy, unrecognisable_fraction
from fedscore.metrics.features import ACCURACY_FLOORS, FeatureExtractor, get_extractor
from fedscore.metrics.fid import fid_from_features, fid_from_stats, frechet_distance
from fedscore.metrics.inception import inception_score
from fedscore.metrics.kid import kid
from fedscore.metrics.prdc import density_coverage, precision_recall
from fedscore.metrics.stats import FeatureStats
from fedscore.metrics.toy import (
    component_frequency_error,
    kl_estimate,
    mmd2_rbf,
    score_error,
    score_mse_per_time,
    sliced_wasserstein,
)

__all__ = [
    "ACCURACY_FLOORS",
    "FeatureExtractor",
    "FeatureStats",
    "class_accuracy",
    "component_frequency_error",
    "density_coverage",
    "fid_from_features",
    "fid_from_stats",
    "frechet_distance",
    "get_extractor",
    "inception_score",
    "kid",
    "kl_estimate",
    "mmd2_rbf",
    "precision_recall",
    "score_error",
    "score_mse_per_time",
    "sliced_wasserstein",
    "unrecognisable_fraction",
]
