"""The one definition of each metric (name, title, direction): every table header, CSV column, interval and
aggregation derives from it. Standard library only, so the offline tools load no numerical library with it."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    """One metric: `name` is its key in ood_metrics and its results.csv column; tables show `title`, in percent."""

    name: str
    title: str
    higher_is_better: bool


METRICS = (Metric("auroc", "AUROC", True), Metric("fpr95", "FPR95", False), Metric("aupr_in", "AUPR-in", True),
           Metric("aupr_out", "AUPR-out", True), Metric("dtacc", "DTACC", True),
           Metric("fpr95_ood_positive", "FPR95 (OOD positive)", False))
METRIC_NAMES = tuple(metric.name for metric in METRICS)  # ood_metrics' keys, in this order
BY_NAME = {metric.name: metric for metric in METRICS}
