"""ExperimentResults made by hand, for the tests of the writers and the offline tools: rows given as results.csv's
fields (metrics in percent, `<metric>_ci_low/high` optional), scores made up."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ood_evaluation.definitions import METRIC_NAMES
from pipeline.config.experiment import ExperimentConfig
from pipeline.result import AverageRow, ExperimentResult, ResultRow, RunScores

IDENTITY = ("model", "train_data", "id_data", "ood_data", "detector")


def intervals_of(fields: dict) -> dict[str, tuple[float, float]]:
    return {metric: (fields[f"{metric}_ci_low"], fields[f"{metric}_ci_high"]) for metric in METRIC_NAMES
            if f"{metric}_ci_low" in fields}


def result_row(fields: dict) -> ResultRow:
    """A ResultRow from results.csv-like fields; metrics absent from them are absent from the row."""
    return ResultRow(**{key: fields[key] for key in IDENTITY}, id_acc=fields["id_acc"],
                     metrics={metric: fields[metric] for metric in METRIC_NAMES if metric in fields},
                     checkpoint=fields.get("checkpoint", ""), intervals=intervals_of(fields))


def average_of(rows: Sequence[ResultRow], label: str, intervals: dict[str, tuple[float, float]]) -> AverageRow:
    """An averages.csv line: the rows' metrics averaged as a run averages them, with the given intervals."""
    first = rows[0]
    return AverageRow(first.model, first.train_data, first.id_data, first.detector, label,
                      tuple(row.ood_data for row in rows),
                      {metric: sum(row.metrics[metric] for row in rows) / len(rows) for metric in first.metrics},
                      first.checkpoint, intervals)


def fake_result(rows: Sequence[dict | ResultRow], averages: Sequence[AverageRow] = (), plots: bool = False,
                scores_per_set: int = 20) -> ExperimentResult:
    """An ExperimentResult of `rows` with made-up per-image scores (the ID set above every OOD set)."""
    rows = tuple(row if isinstance(row, ResultRow) else result_row(row) for row in rows)
    first = rows[0]
    ood_sets = list(dict.fromkeys(row.ood_data for row in rows))
    detectors = list(dict.fromkeys(row.detector for row in rows))
    config = ExperimentConfig(model=first.model, train_data=first.train_data, id_data=first.id_data,
                              ood_data=ood_sets, detectors={name: {"detector": "energy"} for name in detectors},
                              plots=plots)
    sets = [first.id_data, *ood_sets]
    image_ids = {name: np.array([f"{name}/{index}" for index in range(scores_per_set)]) for name in sets}
    scores = {name: {detector: np.linspace(0, 1, scores_per_set) - (name != first.id_data) for detector in detectors}
              for name in sets}
    return ExperimentResult(config, rows, tuple(averages), RunScores(first.id_data, detectors, image_ids, scores),
                            first.id_acc, {}, ())
