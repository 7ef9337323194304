"""The offline demo's image sets, built from data scikit-learn ships: nothing to download.

ID: handwritten digits 0-4 (8x8); near-OOD: digits 5-9; far-OOD: 8x8 grey patches of scikit-learn's sample
photographs, and uniform noise. Every array is grey replicated to RGB, uint8, so the usual transforms apply.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits, load_sample_images
from sklearn.model_selection import train_test_split

from dataloaders.base import DATASET_FORMATS, ArrayImageDataset
from errors import UserError


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    """(N, H, W) uint8 -> (N, H, W, 3)."""
    return np.repeat(grey[..., None], 3, axis=-1)


@DATASET_FORMATS.register("sklearn_digits")
def sklearn_digits(path: Path, split: str, transform: Callable | None, download: bool = False,
                   classes: tuple[int, ...] = tuple(range(10)), test_fraction: float = 0.3,
                   seed: int = 0) -> ArrayImageDataset:
    """Digits of `classes`, split into train/test by a seeded stratified draw; test_fraction 1 = all test."""
    if split not in ("train", "test"):
        raise UserError(f"sklearn_digits has no split '{split}'; valid: train, test")
    if not 0 < test_fraction <= 1:
        raise UserError(f"sklearn_digits: test_fraction must be in (0, 1], got {test_fraction}")
    digits = load_digits()
    keep = np.flatnonzero(np.isin(digits.target, classes))
    if test_fraction == 1:
        train_rows, test_rows = keep[:0], keep
    else:
        train_rows, test_rows = train_test_split(keep, test_size=test_fraction, random_state=seed,
                                                 stratify=digits.target[keep])
    rows = np.sort(train_rows if split == "train" else test_rows)
    if len(rows) == 0:
        raise UserError(f"sklearn_digits: the '{split}' split of classes {list(classes)} is empty")
    images = _grey_to_rgb(np.round(digits.images[rows] * 255 / 16).astype(np.uint8))  # values 0..16
    return ArrayImageDataset("sklearn_digits", images, [f"digits#{row}" for row in rows],
                             digits.target[rows], [], transform)


@DATASET_FORMATS.register("sklearn_photo_patches")
def sklearn_photo_patches(path: Path, split: str, transform: Callable | None, download: bool = False,
                          count: int = 500, patch: int = 32, size: int = 8, seed: int = 0) -> ArrayImageDataset:
    """Random `patch`-pixel squares of the sample photographs, grey, resized to size x size; labels -1."""
    rng = np.random.default_rng(seed)
    photos = [np.asarray(Image.fromarray(photo).convert("L")) for photo in load_sample_images().images]
    patches = []
    for _ in range(count):
        photo = photos[rng.integers(len(photos))]
        top, left = rng.integers(photo.shape[0] - patch), rng.integers(photo.shape[1] - patch)
        square = Image.fromarray(photo[top:top + patch, left:left + patch])
        patches.append(np.asarray(square.resize((size, size), Image.BILINEAR)))
    return ArrayImageDataset("sklearn_photo_patches", _grey_to_rgb(np.stack(patches)),
                             [f"patch#{i}" for i in range(count)], np.full(count, -1), [], transform)


@DATASET_FORMATS.register("uniform_noise")
def uniform_noise(path: Path, split: str, transform: Callable | None, download: bool = False,
                  count: int = 500, size: int = 8, seed: int = 0) -> ArrayImageDataset:
    """Grey images of i.i.d. uniform pixels; labels -1."""
    grey = np.random.default_rng(seed).integers(0, 256, size=(count, size, size), dtype=np.uint8)
    return ArrayImageDataset("uniform_noise", _grey_to_rgb(grey), [f"noise#{i}" for i in range(count)],
                             np.full(count, -1), [], transform)
