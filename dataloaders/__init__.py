"""Dataset registry: typed dataset configs, registered on-disk formats, bank sampling and debug subsets."""
from __future__ import annotations

from dataloaders import arrays, demo, folders, imagelist  # noqa: F401  (registers the formats)
from dataloaders.bank import bank_indices, subset_indices
from dataloaders.base import DATASET_FORMATS, DatasetConfig, ImageDataset, build_dataset

__all__ = ["DATASET_FORMATS", "DatasetConfig", "ImageDataset", "bank_indices", "build_dataset", "subset_indices"]
