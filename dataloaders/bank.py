"""Which train samples form the NNGuide bank: a seeded random fraction, as the official code draws it."""
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
