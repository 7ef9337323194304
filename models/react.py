"""ReAct (Sun et al., NeurIPS 2021): clip penultimate activations at a quantile of the ID bank's features."""
from __future__ import annotations

import numpy as np
from torch import Tensor


def react_threshold(bank_features: np.ndarray, percentile: float) -> float:
    """The `percentile` quantile (in (0, 1)) of all raw, unclipped bank activations, as in the paper's code."""
    return float(np.quantile(bank_features.ravel(), percentile))


def apply_react(features: Tensor, threshold: float) -> Tensor:
    """(N, D) features with every activation above `threshold` set to it."""
    return features.clip(max=threshold)
