"""Evaluation of OOD scores: metrics, bootstrap intervals and paired comparisons. numpy and scikit-learn only.

    from ood_evaluation.metrics import ood_metrics
    from ood_evaluation.bootstrap import bootstrap_metrics
    ood_metrics(id_scores, ood_scores)         # {"auroc": 0.93, "fpr95": 0.31, ...}: fractions, not percent
    bootstrap_metrics(id_scores, ood_scores)   # {"auroc": (low, high), ...}: 95% percentile intervals

Scores are (N,) arrays, higher = more in-distribution. Imports nothing from the rest of the repository; this file
imports no module, so `ood_evaluation.definitions` loads without numpy or scikit-learn.
"""
