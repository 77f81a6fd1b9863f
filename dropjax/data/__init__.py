"""Datasets (CIFAR-10, GTSRB) as uint8 arrays, and on-device augmentation."""
from dropjax.data.datasets import (DATASETS, Dataset, DatasetSpec, Split, load_dataset,
                                   resolve_data_dir)

__all__ = ["DATASETS", "Dataset", "DatasetSpec", "Split", "load_dataset",
           "resolve_data_dir"]
