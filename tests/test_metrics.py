"""OOD metrics on hand-checked cases, ties included, in both FPR95 conventions."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ood_evaluation.metrics import ood_metrics


def test_perfect_separation():
    metrics = ood_metrics(np.array([3.0, 2.0, 1.0]), np.array([0.0, -1.0]))
    assert metrics == {"auroc": 1.0, "fpr95": 0.0, "aupr_in": 1.0, "aupr_out": 1.0, "dtacc": 1.0,
                       "fpr95_ood_positive": 0.0}


def test_aupr_of_perfectly_separated_scores_is_exactly_one():
    """scikit-learn's average precision rounds to 1 + 2e-16 here; the metrics stay fractions in [0, 1]."""
    metrics = ood_metrics(np.arange(20) + 100.0, np.arange(10.0))
    assert metrics["aupr_in"] == 1.0 and metrics["aupr_out"] <= 1.0


def test_reversed_scores():
    metrics = ood_metrics(np.array([0.0, -1.0]), np.array([3.0, 2.0, 1.0]))
    assert metrics["auroc"] == 0.0 and metrics["fpr95"] == 1.0 and metrics["fpr95_ood_positive"] == 1.0


def test_hand_checked_interleaving():
    # ID 4, 3, 1; OOD 2, 0.  AUROC = pairs ranked right / all pairs = (2 + 2 + 1) / 6.
    metrics = ood_metrics(np.array([4.0, 3.0, 1.0]), np.array([2.0, 0.0]))
    assert metrics["auroc"] == pytest.approx(5 / 6)
    # ROC points (fpr, tpr): (0,0) (0,1/3) (0,2/3) (1/2,2/3) (1/2,1) (1,1); |tpr - .95| is smallest at tpr=1,
    # first reached at fpr=1/2.
    assert metrics["fpr95"] == pytest.approx(0.5)
    # DTACC: max of (tpr + 1 - fpr) / 2 = (2/3 + 1) / 2 at (0, 2/3), or (1 + 1/2) / 2 at (1/2, 1).
    assert metrics["dtacc"] == pytest.approx(5 / 6)
    # AUPR-in: precision at each ID hit: 1, 1, 3/4 -> mean 11/12.
    assert metrics["aupr_in"] == pytest.approx(11 / 12)
    # AUPR-out (OOD positive, -score): OOD 0 first (precision 1), OOD 2 after ID 1 (precision 2/3).
    assert metrics["aupr_out"] == pytest.approx(5 / 6)
    # OpenOOD: OOD positive; to detect >= 95% of OOD, both OOD must be caught, threshold below 2: ID 1 rejected.
    assert metrics["fpr95_ood_positive"] == pytest.approx(1 / 3)


def test_ties_count_half_in_auroc():
    metrics = ood_metrics(np.array([1.0, 1.0]), np.array([1.0, 1.0]))
    assert metrics["auroc"] == 0.5 and metrics["fpr95"] == 1.0 and metrics["dtacc"] == 0.5


def test_the_two_fpr95_conventions_differ_where_they_should():
    # 95% of ID and 95% of OOD need different thresholds here.
    id_scores = np.arange(1, 21, dtype=float)            # 1..20
    ood_scores = np.concatenate([np.full(19, -1.0), [10.5]])
    metrics = ood_metrics(id_scores, ood_scores)
    # Paper: keep 95% of ID (threshold 2 keeps 19/20) -> the OOD at 10.5 passes: FPR = 1/20.
    assert metrics["fpr95"] == pytest.approx(1 / 20)
    # OpenOOD: reject 95% of OOD (the 19 at -1 suffice) while keeping every ID: FPR = 0.
    assert metrics["fpr95_ood_positive"] == 0.0


def test_accepts_torch_and_rejects_bad_scores():
    as_torch = ood_metrics(torch.tensor([3.0, 2.0]), torch.tensor([1.0]))
    assert as_torch["auroc"] == 1.0
    with pytest.raises(ValueError, match="ood_scores has 1 NaN or inf values of 2"):
        ood_metrics(np.array([1.0]), np.array([np.nan, 0.0]))
    with pytest.raises(ValueError, match="id_scores is empty"):
        ood_metrics(np.array([]), np.array([1.0]))


def test_the_evaluation_package_loads_no_torch():
    """ood_evaluation scores numpy arrays and torch tensors alike without importing torch."""
    code = ("import sys, ood_evaluation.metrics, ood_evaluation.bootstrap, ood_evaluation.definitions; "
            "print('torch' in sys.modules)")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True, check=True, timeout=120).stdout
    assert loaded.strip() == "False"


def test_torch_tensors_score_as_their_numpy_values():
    id_scores, ood_scores = torch.tensor([4.0, 3.0, 1.0]), torch.tensor([2.0, 0.0])
    assert ood_metrics(id_scores, ood_scores) == ood_metrics(id_scores.numpy(), ood_scores.numpy())
