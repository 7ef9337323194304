"""Scoring cached features: the classifier head on them (ReAct applied), every detector fitted on the bank and
scoring each test set, and the rows of metrics with their bootstrap intervals."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from errors import UserError
from models import Backbone, react_threshold
from ood_evaluation.bootstrap import bootstrap_averages
from ood_evaluation.definitions import METRIC_NAMES
from ood_evaluation.metrics import ood_metrics
from pipeline.config.experiment import ExperimentConfig
from pipeline.result import AverageRow, ResultRow
from pipeline.run.averages import run_averages

log = logging.getLogger(__name__)

BOOTSTRAP_SEED = 0  # the intervals' resampling: fixed, so a rerun gives the same files


@dataclass(frozen=True)
class RawFeatures:
    """Cached penultimate features (before any clipping) and labels of one image set."""

    features: np.ndarray  # (N, D) float32
    labels: np.ndarray    # (N,) int64, -1 = unlabelled
    image_ids: list[str]  # (N,) the dataset's ids of these rows
    entry: str = ""       # the cache entry's label
    broken: tuple[str, ...] = ()  # ids of the images left out as undecodable (--skip-broken-images)


def model_outputs(raw: RawFeatures, backbone: Backbone, clip: float | None, device: torch.device, name: str
                  ) -> dict[str, torch.Tensor]:
    """What detectors see: L2-normalised features and logits of the cached rows (features ReAct-clipped)."""
    rows = torch.from_numpy(raw.features).to(device)
    bad_rows = int((~torch.isfinite(rows)).any(dim=1).sum())
    if bad_rows:
        raise UserError(f"{name}: {bad_rows} of {len(rows)} feature rows are NaN or inf "
                        f"(check the images and weights, then re-extract with a fresh --cache-dir)")
    with torch.inference_mode():
        features, logits = backbone.outputs(rows, clip)
    bad_rows = int((~torch.isfinite(logits)).any(dim=1).sum())
    if bad_rows:
        raise UserError(f"{name}: {bad_rows} of {len(logits)} rows of logits are NaN or inf although the features "
                        f"are finite (check the classifier's weights in the checkpoint)")
    return {"feas": torch.nn.functional.normalize(features, dim=1), "logits": logits,
            "labels": torch.from_numpy(raw.labels).to(device)}


def detector_inputs(backbone: Backbone, react_percentile: float | None, bank_raw: RawFeatures,
                    test_raws: dict[str, RawFeatures], device: torch.device, bank_name: str
                    ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """`model_outputs` of the bank and of every test set, with ReAct's clip (the `react_percentile` quantile of the
    bank's raw features) when the model config asks for it."""
    clip = None
    if react_percentile is not None:
        clip = react_threshold(bank_raw.features, react_percentile)
        log.info("ReAct: clipping features at %.4f, the %.2f quantile of the bank", clip, react_percentile)
    backbone = backbone.to(device)
    return (model_outputs(bank_raw, backbone, clip, device, bank_name),
            {name: model_outputs(raw, backbone, clip, device, name) for name, raw in test_raws.items()})


def score_detector(detector: str, scores: dict[str, dict[str, np.ndarray]], id_name: str, ood_names: list[str],
                   identity: dict[str, str], id_accuracy: float, config: ExperimentConfig
                   ) -> tuple[list[ResultRow], list[AverageRow]]:
    """One detector's rows (metrics in percent, with intervals) and averages, from its scores of every set. All
    intervals come from one set of resamples, each drawing the ID images once (ood_evaluation.bootstrap)."""
    id_scores = scores[id_name][detector]
    metrics = {name: {metric: 100 * value for metric, value in ood_metrics(id_scores, scores[name][detector]).items()}
               for name in ood_names}
    averaged = run_averages(ood_names)
    intervals = (bootstrap_averages(id_scores, {name: scores[name][detector] for name in ood_names},
                                    [sets for _, sets in averaged], config.bootstrap, BOOTSTRAP_SEED, config.ci_level)
                 if config.bootstrap else {})

    def in_percent(found: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        return {metric: (100 * low, 100 * high) for metric, (low, high) in found.items()}

    rows = [ResultRow(ood_data=name, detector=detector, metrics=metrics[name], id_acc=id_accuracy,
                      intervals=in_percent(intervals.get((name,), {})), **identity) for name in ood_names]
    averages = [AverageRow(detector=detector, label=label, ood_sets=tuple(sets),
                           metrics={metric: sum(metrics[name][metric] for name in sets) / len(sets)
                                    for metric in METRIC_NAMES},
                           intervals=in_percent(intervals.get(tuple(sets), {})), **identity)
                for label, sets in averaged]
    return rows, averages
