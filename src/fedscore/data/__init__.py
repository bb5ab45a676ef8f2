"""Data (SPEC §5): bundled and local datasets, the user's own images (`own`), and worker
partitions."""

from fedscore.data.partition import SCHEMES, class_histogram, partition
from fedscore.data.plots import plot_partition
from fedscore.data.sources import (
    DATASETS,
    DatasetInfo,
    check_labels,
    family,
    groups,
    info,
    load,
    shape_and_classes,
)

__all__ = [
    "DATASETS",
    "SCHEMES",
    "DatasetInfo",
    "check_labels",
    "class_histogram",
    "family",
    "groups",
    "info",
    "load",
    "partition",
    "plot_partition",
    "shape_and_classes",
]
