"""The dataset config, the image dataset every format returns, and the format registry."""
from __future__ import annotations

import hashlib
import inspect
import json
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
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


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")  # Pillow's unsigned 16-bit grey modes
FILES_PER_TASK = 256  # files one thread stats or hashes per task: few futures, yet parallel reads


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB. Integer grey (modes I;16*, I, read as 16-bit values clipped to [0, 65535]) keeps
    its high byte; float grey (F) is read as intensities in [0, 1], rounded, clipped, NaN as 0; every 8-bit mode
    is converted exactly as `convert("RGB")` does, which would clip wider values at 255 (see docs/datasets.md,
    "How images are read")."""
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "I":
        values = np.asarray(image).astype(np.int32)  # (H, W); I;16B arrives big-endian, I as int32
        image = Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8))
    elif image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
        image = Image.fromarray(np.floor(np.clip(values, 0.0, 1.0) * 255 + 0.5).astype(np.uint8))
    return image.convert("RGB")


def _in_blocks(function: Callable[[str], Any], paths: Sequence[str]) -> list[Any]:
    """[function(path) for path in paths], computed by a thread pool in blocks of FILES_PER_TASK, in path order.

    Threads overlap the file system's latency (stat and read release the GIL, and so does sha256 on large
    buffers); the results keep the order of `paths`, whatever order the threads finish in."""
    blocks = [paths[start:start + FILES_PER_TASK] for start in range(0, len(paths), FILES_PER_TASK)]
    if len(blocks) <= 1:
        return [function(path) for path in paths]
    with ThreadPoolExecutor() as pool:
        results = pool.map(lambda block: [function(path) for path in block], blocks)
        return [result for block_results in results for result in block_results]


def _file_stat(path: str) -> list[int] | str:
    """[size, modification time in ns] of the file at `path` (links followed), or why it cannot be stat'ed."""
    try:
        info = os.stat(path)
    except OSError as error:  # gone or unreadable since it was listed: decoding will report it as broken
        return f"cannot stat: {error.strerror}"
    return [info.st_size, info.st_mtime_ns]


def _file_sha256(path: str) -> str:
    """sha256 hex of the file's bytes, read in chunks, or why it cannot be read."""
    try:
        with open(path, "rb") as stream:
            return hashlib.file_digest(stream, "sha256").hexdigest()
    except OSError as error:  # gone or unreadable since it was listed: decoding will report it as broken
        return f"cannot read: {error.strerror}"


class ImageDataset(Dataset):
    """Images with int labels (-1 = unlabelled) and one stable id each, in a fixed order.

    `__getitem__` returns `(transform(rgb_pil_image), label)`, or the PIL image itself when
    `transform` is None. Subclasses say where pixels come from (`_load_image`), what the fingerprint hashes
    besides the format name (`_hash_contents`) and what the content fingerprint hashes (`_hash_image_bytes`).
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
        self._content_fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[object, int]:
        image = self._load_image(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])

    def fingerprint(self) -> str:
        """sha256 hex of the format name, the ids in order and, per image file, its size and st_mtime_ns (links
        followed); array formats hash their data files' bytes. The feature cache's key; memoised; no file reads.

        Blind to a file replaced by one of the same size and modification time, which `content_fingerprint`
        catches (see docs/cache.md, "The image-set fingerprint")."""
        if self._fingerprint is None:
            digest = self._new_digest()
            self._hash_contents(digest)
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def content_fingerprint(self, rows: Iterable[int] | None = None) -> str:
        """sha256 hex of the format name and, in row order, each image's id and the sha256 of its bytes (pixels
        for arrays), for the images at `rows` (all when None; memoised then). Reads every byte.

        A check on the cache key, not a second key: record it beside the features of the rows it covers, and
        recompute and compare it before reusing them (see docs/design.md, "Extract once, cache raw features").
        Row order is the dataset's; file times do not enter, so `touch` or a copy leaves it unchanged."""
        if rows is None and self._content_fingerprint is not None:
            return self._content_fingerprint
        selected = range(len(self)) if rows is None else [int(row) for row in rows]
        digest = self._new_digest()
        self._hash_image_bytes(digest, selected)
        if rows is None:
            self._content_fingerprint = digest.hexdigest()
        return digest.hexdigest()

    def _new_digest(self) -> Any:
        return hashlib.sha256(json.dumps(self.format_name).encode() + b"\n")

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

    def _hash_image_bytes(self, digest, rows: Sequence[int]) -> None:
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
                return to_rgb(image)  # decodes now: a truncated file fails here, not in the transform
        except (OSError, Image.DecompressionBombError) as error:
            # OSError: PIL.UnidentifiedImageError, truncated data, an unreadable file. DecompressionBombError:
            # more than 2 x Image.MAX_IMAGE_PIXELS pixels, which Pillow refuses to decode (it is no OSError)
            raise BrokenImageError(f"cannot decode image {path}: {error}") from None

    def _hash_contents(self, digest) -> None:
        for image_id, stat in zip(self.image_ids, _in_blocks(_file_stat, self._paths(range(len(self))))):
            digest.update(json.dumps([image_id, stat]).encode() + b"\n")

    def _hash_image_bytes(self, digest, rows: Sequence[int]) -> None:
        for row, file_sha256 in zip(rows, _in_blocks(_file_sha256, self._paths(rows))):
            digest.update(json.dumps([self.image_ids[row], file_sha256]).encode() + b"\n")

    def _paths(self, rows: Iterable[int]) -> list[str]:
        root = os.fspath(self.root)
        return [os.path.join(root, self.image_ids[row]) for row in rows]

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

    def _hash_image_bytes(self, digest, rows: Sequence[int]) -> None:
        for row in rows:
            pixels_sha256 = hashlib.sha256(np.ascontiguousarray(self.images[row]).tobytes()).hexdigest()
            digest.update(json.dumps([self.image_ids[row], pixels_sha256]).encode() + b"\n")

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
