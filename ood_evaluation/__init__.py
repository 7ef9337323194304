"""Evaluation of OOD scores: metrics, bootstrap intervals and paired comparisons. numpy and scikit-learn only.

    from ood_evaluation import ood_metrics, bootstrap_metrics
    ood_metrics(id_scores, ood_scores)         # {"auroc": 0.93, "fpr95": 0.31, ...}: fractions, not percent
    bootstrap_metrics(id_scores, ood_scores)   # {"auroc": (low, high), ...}: 95% percentile intervals

Scores are (N,) arrays, higher = more in-distribution. Imports nothing from the rest of the repository.
"""
from ood_evaluation.bootstrap import bootstrap_averages, bootstrap_metrics, paired_bootstrap
from ood_evaluation.metrics import METRICS, Metric, ood_metrics

__all__ = ["METRICS", "Metric", "bootstrap_averages", "bootstrap_metrics", "ood_metrics", "paired_bootstrap"]
