"""Data (SPEC §5): bundled and local datasets, and worker partitions."""

from fedscore.data.sources import DATASETS, info, load

__all__ = ["DATASETS", "info", "load"]
