"""A torch Dataset given as a Python object (the library call's `datasets=`), read as an ImageDataset."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from dataloaders.base import ImageDataset
from errors import UserError


class TorchImageDataset(ImageDataset):
    """The items of a torch Dataset that yields (PIL image or (H, W, 3) uint8 array, int label).

    Nothing else says what such a dataset holds, so it is read once when wrapped: each image's pixels are hashed
    (its fingerprint, the feature cache's key) and its label kept; extraction reads the images again.
    """

    def __init__(self, name: str, dataset: Dataset, transform: Callable | None) -> None:
        hashes, labels = [], []
        for index in tqdm(range(len(dataset)), unit="img", desc=f"{name}: fingerprint"):
            image, label = self._item(name, dataset, index)
            hashes.append(_pixels_sha256(image))
            labels.append(label)
        self._setup(name, dataset, np.arange(len(dataset)), hashes, labels, transform)

    def _setup(self, name: str, dataset: Dataset, rows: np.ndarray, hashes: Sequence[str], labels: Sequence[int],
               transform: Callable | None) -> None:
        ImageDataset.__init__(self, f"python:{type(dataset).__qualname__}",
                              [f"{name}#{row}" for row in rows], labels, transform)
        self.name, self.dataset, self.rows, self.hashes = name, dataset, rows, list(hashes)

    @staticmethod
    def _item(name: str, dataset: Dataset, index: int) -> tuple[Image.Image, int]:
        item = dataset[int(index)]
        image, label = item if isinstance(item, tuple) and len(item) == 2 else (item, None)
        if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
            image = Image.fromarray(image)
        if isinstance(label, torch.Tensor) and label.ndim == 0 and not label.is_floating_point():
            label = label.item()  # e.g. torchvision's FakeData
        if not isinstance(image, Image.Image) or isinstance(label, bool) or not isinstance(label, (int, np.integer)):
            raise UserError(f"dataset '{name}': item {index} is {_describe(item)}; expected (PIL image or (H, W, 3) "
                            f"uint8 array, int label), e.g. a torchvision dataset made with transform=None")
        return image.convert("RGB"), int(label)

    def _load_image(self, index: int) -> Image.Image:
        return self._item(self.name, self.dataset, self.rows[index])[0]

    def _hash_contents(self, digest) -> None:
        self._hash_image_bytes(digest, range(len(self)))

    def _hash_image_bytes(self, digest, rows: Sequence[int]) -> None:
        for row in rows:
            digest.update(json.dumps([self.image_ids[row], self.hashes[row], int(self.labels[row])]).encode() + b"\n")

    def _take(self, indices: np.ndarray) -> TorchImageDataset:
        taken = TorchImageDataset.__new__(TorchImageDataset)
        taken._setup(self.name, self.dataset, self.rows[indices], [self.hashes[i] for i in indices],
                     self.labels[indices], self.transform)
        return taken


def _pixels_sha256(image: Image.Image) -> str:
    return hashlib.sha256(json.dumps([image.mode, image.size]).encode() + image.tobytes()).hexdigest()


def _describe(item: object) -> str:
    parts = item if isinstance(item, tuple) else (item,)
    return "(" + ", ".join(type(part).__name__ for part in parts) + ")"
