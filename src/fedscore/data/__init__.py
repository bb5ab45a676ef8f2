"""Data (SPEC §5): bundled and local datasets, and worker partitions."""

from fedscore.data.partition import SCHEMES, class_histogram, partition, plot_partition
from fedscore.data.sources import DATASETS, info, load

__all__ = ["DATASETS", "SCHEMES", "class_histogram", "info", "load", "partition",
           "plot_partition"]
