"""Data (SPEC §5): bundled and local datasets, and worker partitions."""

from fedscore.data.partition import SCHEMES, class_histogram, partition
from fedscore.data.plots import plot_partition
from fedscore.data.sources import (
    DATASETS,
    DatasetInfo,
    family,
    info,
    load,
    shape_and_classes,
)

__all__ = [
    "DATASETS",
    "SCHEMES",
    "DatasetInfo",
    "class_histogram",
    "family",
    "info",
    "load",
    "partition",
    "plot_partition",
    "shape_and_classes",
]
