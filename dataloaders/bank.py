"""Seeded samples of a split: the NNGuide bank (a random fraction, as the official code draws it) and the fixed
subsets of a debug run."""
from __future__ import annotations

import numpy as np

from errors import UserError


def bank_indices(num_train: int, ratio: float, seed: int) -> np.ndarray:
    """The first int(num_train * ratio) entries of a seeded permutation of range(num_train), int64.

    Equal to the official `np.random.seed(seed); idx = np.arange(N); np.random.shuffle(idx)`.
    """
    if not 0 < ratio <= 1:
        raise UserError(f"bank ratio must be in (0, 1], got {ratio}")
    count = int(num_train * ratio)
    if count == 0:
        raise UserError(f"bank ratio {ratio} of {num_train} train samples selects no sample")
    return np.random.RandomState(seed).permutation(num_train)[:count].astype(np.int64)


# the default of the experiment key subset_seed; apart from the bank's seed, so that a bank-seed sweep scores the
# same test images
SUBSET_SEED = 0


def subset_indices(labels: np.ndarray, count: int, seed: int = SUBSET_SEED) -> np.ndarray:
    """`count` sorted row indices of a split of len(labels) samples, stratified by label: each class keeps its share
    of `count` (largest remainders, ties to the smaller label), drawn by one RandomState(seed) stream permuting the
    class's rows, class by class in label order. Unlabelled splits (-1) are one class. A count of len(labels) or more
    keeps every row, whatever the seed."""
    labels = np.asarray(labels).reshape(-1)
    if count >= len(labels):
        return np.arange(len(labels), dtype=np.int64)
    classes, sizes = np.unique(labels, return_counts=True)
    shares = count * sizes / len(labels)
    kept = np.floor(shares).astype(np.int64)
    by_remainder = np.argsort(-(shares - kept), kind="stable")  # stable: equal remainders go to smaller labels
    kept[by_remainder[:count - kept.sum()]] += 1
    random = np.random.RandomState(seed)
    chosen = [random.permutation(np.flatnonzero(labels == label))[:number] for label, number in zip(classes, kept)]
    return np.sort(np.concatenate(chosen)).astype(np.int64)
