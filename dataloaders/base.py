"""The dataset config, the image dataset every format returns, and the format registry."""
from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from errors import UserError, did_you_mean
from registry import Registry

# name -> builder(path=..., split=..., transform=..., download=...) -> ImageDataset
DATASET_FORMATS = Registry("dataset format")
BUILDER_ARGUMENTS = ("path", "split", "transform", "download")  # what build_dataset passes; the rest are options


@dataclass(frozen=True)
class DatasetConfig:
    """One `configs/datasets/<name>.yaml`: which format reads it and where each split lives."""

    name: str  # the CLI name, equal to the YAML file's stem
    format: str  # a name registered in DATASET_FORMATS, e.g. "class_folders"
    splits: dict[str, str]  # split name ("train", "test", ...) -> folder relative to the data root
    options: dict[str, Any] = field(default_factory=dict)  # format-specific settings, passed to the builder

    def __post_init__(self) -> None:
        """A misspelt option fails when the YAML is loaded, not as a TypeError once the split is read."""
        if self.format not in DATASET_FORMATS.names():
            return  # build_dataset names the unknown format and the valid ones
        parameters = inspect.signature(DATASET_FORMATS.get(self.format)).parameters.values()
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        valid = [parameter.name for parameter in parameters
                 if parameter.kind in named and parameter.name not in BUILDER_ARGUMENTS]
        for key in self.options:
            if key not in valid:
                raise UserError(f"dataset '{self.name}': format '{self.format}' has no option '{key}'"
                                f"{did_you_mean(str(key), valid)}; valid options: {', '.join(valid) or 'none'}")


class BrokenImageError(UserError):
    """An image file that cannot be read or decoded; the message names its path."""


class ImageDataset(Dataset):
    """Images with int labels (-1 = unlabelled) and one stable id each, in a fixed order.

    `__getitem__` returns `(transform(rgb_pil_image), label)`, or the PIL image itself when
    `transform` is None. Subclasses say where pixels come from (`_load_image`) and what the
    fingerprint hashes besides the format name and the ids (`_hash_contents`).
    """

    def __init__(self, format_name: str, image_ids: Sequence[str], labels: Iterable[int],
                 transform: Callable | None, skipped: Sequence[str] = ()) -> None:
        self.format_name = format_name
        self.image_ids = list(image_ids)
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)  # (N,)
        if len(self.labels) != len(self.image_ids):
            raise ValueError(f"{len(self.image_ids)} image ids but {len(self.labels)} labels")
        self.transform = transform
        self.skipped = list(skipped)
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[object, int]:
        image = self._load_image(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])

    def fingerprint(self) -> str:
        """sha256 hex of the format name, the ids in order and the files behind them; memoised."""
        if self._fingerprint is None:
            digest = hashlib.sha256(json.dumps(self.format_name).encode() + b"\n")
            self._hash_contents(digest)
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def subset(self, indices: np.ndarray) -> ImageDataset:
        """The samples at `indices`, in that order (e.g. the bank drawn from a train split).

        `skipped` stays with the parent: it describes the folder listing, not the samples."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.ndim != 1 or (indices.size and (indices.min() < 0 or indices.max() >= len(self))):
            raise ValueError(f"subset indices must be a 1-D array in [0, {len(self)})")
        return self._take(indices)

    def _load_image(self, index: int) -> Image.Image:
        raise NotImplementedError

    def _hash_contents(self, digest) -> None:
        raise NotImplementedError

    def _take(self, indices: np.ndarray) -> ImageDataset:
        raise NotImplementedError


class FileImageDataset(ImageDataset):
    """Images stored as files; `image_ids` are their paths relative to `root` (posix form)."""

    def __init__(self, format_name: str, root: Path, image_ids: Sequence[str], labels: Iterable[int],
                 transform: Callable | None, skipped: Sequence[str] = ()) -> None:
        super().__init__(format_name, image_ids, labels, transform, skipped)
        self.root = Path(root)

    def _load_image(self, index: int) -> Image.Image:
        path = self.root / self.image_ids[index]
        try:
            with Image.open(path) as image:
                return image.convert("RGB")  # decodes now: a truncated file fails here, not in the transform
        except OSError as error:  # PIL.UnidentifiedImageError, truncated data, an unreadable file
            raise BrokenImageError(f"cannot decode image {path}: {error}") from None

    def _hash_contents(self, digest) -> None:
        for image_id in self.image_ids:
            size = (self.root / image_id).stat().st_size
            digest.update(json.dumps([image_id, size]).encode() + b"\n")

    def _take(self, indices: np.ndarray) -> FileImageDataset:
        return FileImageDataset(self.format_name, self.root, [self.image_ids[i] for i in indices],
                                self.labels[indices], self.transform)


class ArrayImageDataset(ImageDataset):
    """Images held in memory as uint8 (N, H, W, 3), read from `data_files` (CIFAR, SVHN) or generated."""

    def __init__(self, format_name: str, images: np.ndarray, image_ids: Sequence[str],
                 labels: Iterable[int], data_files: Sequence[Path], transform: Callable | None) -> None:
        super().__init__(format_name, image_ids, labels, transform)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) != len(self):
            raise ValueError(f"expected {len(self)} uint8 HxWx3 images, got {images.dtype} {images.shape}")
        self.images = images
        self.data_files = [Path(file) for file in data_files]

    def _load_image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index]).convert("RGB")

    def _hash_contents(self, digest) -> None:
        for image_id in self.image_ids:
            digest.update(json.dumps(image_id).encode() + b"\n")
        for data_file in self.data_files:
            digest.update(json.dumps(data_file.name).encode() + b"\n")
            with data_file.open("rb") as stream:
                while chunk := stream.read(1 << 20):
                    digest.update(chunk)
        if not self.data_files:  # generated in memory: the pixels are the content
            digest.update(np.ascontiguousarray(self.images).tobytes())

    def _take(self, indices: np.ndarray) -> ArrayImageDataset:
        return ArrayImageDataset(self.format_name, self.images[indices], [self.image_ids[i] for i in indices],
                                 self.labels[indices], self.data_files, self.transform)


def build_dataset(config: DatasetConfig, split: str, data_root: Path, transform: Callable | None,
                  download: bool = False) -> ImageDataset:
    """Read one split of a configured dataset with its registered format."""
    if split not in config.splits:
        raise UserError(f"dataset '{config.name}' has no split '{split}'; "
                        f"its splits: {', '.join(sorted(config.splits))}")
    builder = DATASET_FORMATS.get(config.format)
    return builder(path=Path(data_root) / config.splits[split], split=split, transform=transform,
                   download=download, **config.options)
