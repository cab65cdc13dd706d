"""Datasets and partitioners.

``DATASETS`` maps a name to a loader ``(root, download) -> Dataset``; ``PARTITIONERS``
maps a name to a function ``(labels, num_partitions, seed, **params) -> list[ndarray]``.
"""

from fedkd.data.base import DATASETS, Dataset, load_dataset
from fedkd.data.partition import PARTITIONERS, label_counts, partition

# Built-ins register themselves on import.
from fedkd.data import builtin, vision  # noqa: E402,F401  isort: skip

__all__ = ["DATASETS", "PARTITIONERS", "Dataset", "label_counts", "load_dataset", "partition"]
