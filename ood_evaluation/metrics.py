"""OOD metrics with ID as the positive class and higher score = more in-distribution (the metrics' names, titles and
directions are defined once, in ood_evaluation.definitions).

Two FPR95 conventions are reported because readers compare against both:
- `fpr95` (the paper's code, KNN-OOD, ViM): ID positive; the FPR (OOD accepted as ID) at the ROC point
  whose TPR is nearest to 0.95, argmin |tpr - 0.95|.
- `fpr95_ood_positive` (OpenOOD v1.5, pytorch-ood): OOD positive on negated scores; the FPR (ID rejected
  as OOD) at the first threshold whose TPR (OOD detected) reaches 0.95.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import auc, average_precision_score, roc_curve


def as_scores(scores: Any, what: str) -> np.ndarray:
    """`scores` (numpy, a sequence, or a torch tensor on any device) as a flat, finite float64 array."""
    if hasattr(scores, "detach"):  # a torch tensor, read without importing torch
        scores = scores.detach().cpu().numpy()
    array = np.asarray(scores).astype(np.float64).ravel()
    if array.size == 0:
        raise ValueError(f"{what} is empty")
    if not np.isfinite(array).all():
        raise ValueError(f"{what} has {int((~np.isfinite(array)).sum())} NaN or inf values of {array.size}")
    return array


def ood_metrics(id_scores: Any, ood_scores: Any) -> dict[str, float]:
    """{name: value} for every metric of METRICS, as fractions in [0, 1] (the tables show percent).

    id_scores (N,), ood_scores (M,): higher = more in-distribution; a ValueError names an empty or non-finite one.
    """
    id_scores = as_scores(id_scores, "id_scores")
    ood_scores = as_scores(ood_scores, "ood_scores")
    scores = np.concatenate([id_scores, ood_scores])
    is_id = np.concatenate([np.ones(id_scores.size, dtype=int), np.zeros(ood_scores.size, dtype=int)])

    fpr, tpr, _ = roc_curve(is_id, scores, drop_intermediate=False)
    ood_fpr, ood_tpr, _ = roc_curve(1 - is_id, -scores, drop_intermediate=False)
    return {
        "auroc": float(auc(fpr, tpr)),
        "fpr95": float(fpr[np.argmin(np.abs(tpr - 0.95))]),
        # sklearn sums precision x recall steps, which can round to 1 + 2e-16 on perfectly separated scores
        "aupr_in": min(1.0, float(average_precision_score(is_id, scores))),
        "aupr_out": min(1.0, float(average_precision_score(1 - is_id, -scores))),
        "dtacc": float(np.max(0.5 * (tpr + 1 - fpr))),
        "fpr95_ood_positive": float(ood_fpr[np.argmax(ood_tpr >= 0.95)]),
    }
