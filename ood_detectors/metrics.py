"""OOD metrics with ID as the positive class and higher score = more in-distribution.

Two FPR95 conventions are reported because readers compare against both:
- `fpr95` (the paper's code, KNN-OOD, ViM): ID positive; the FPR (OOD accepted as ID) at the ROC point
  whose TPR is nearest to 0.95, argmin |tpr - 0.95|.
- `fpr95_ood_positive` (OpenOOD v1.5, pytorch-ood): OOD positive on negated scores; the FPR (ID rejected
  as OOD) at the first threshold whose TPR (OOD detected) reaches 0.95.
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import auc, average_precision_score, roc_curve

ArrayLike = np.ndarray | torch.Tensor


def _as_numpy(scores: ArrayLike, what: str) -> np.ndarray:
    array = scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
    array = array.astype(np.float64).ravel()
    if array.size == 0:
        raise ValueError(f"{what} is empty")
    if not np.isfinite(array).all():
        raise ValueError(f"{what} has {int((~np.isfinite(array)).sum())} NaN or inf values of {array.size}")
    return array


def ood_metrics(id_scores: ArrayLike, ood_scores: ArrayLike) -> dict[str, float]:
    """auroc, fpr95, aupr_in, aupr_out, dtacc and fpr95_ood_positive, as fractions in [0, 1]."""
    id_scores = _as_numpy(id_scores, "id_scores")
    ood_scores = _as_numpy(ood_scores, "ood_scores")
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
