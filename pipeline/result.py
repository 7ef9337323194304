"""What a run returns: one frozen ExperimentResult holding everything its files are written from."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # the offline tools read rows without loading torch, which the config module imports
    from pipeline.config.experiment import ExperimentConfig

Interval = tuple[float, float]  # (low, high), percent


@dataclass(frozen=True)
class ResultRow:
    """One (OOD set, detector) line of results.csv. `metrics` maps ood_evaluation's METRIC_NAMES to percent (a row
    read back from results_openood.csv holds the metrics of that file only); `intervals` maps a metric to its
    bootstrap interval in percent and is empty without one. `source` is the file a row was read from, if any."""

    model: str
    train_data: str
    id_data: str
    ood_data: str
    detector: str
    metrics: Mapping[str, float]
    id_acc: float
    checkpoint: str = ""
    intervals: Mapping[str, Interval] = field(default_factory=dict)
    source: str = ""


@dataclass(frozen=True)
class AverageRow:
    """One line of averages.csv: a detector's metrics averaged over `ood_sets` (percent), with the bootstrap
    interval of that average; `label` is the table column (Avg-4, Avg-all, Near-OOD, Far-OOD)."""

    model: str
    train_data: str
    id_data: str
    detector: str
    label: str
    ood_sets: tuple[str, ...]
    metrics: Mapping[str, float]
    checkpoint: str = ""
    intervals: Mapping[str, Interval] = field(default_factory=dict)
    source: str = ""


@dataclass(frozen=True)
class RunScores:
    """Per-image scores of a run: `scores[set][detector]` (N,) float64 aligned with `image_ids[set]` (N,); the ID
    set first. Higher = more in-distribution."""

    id_set: str
    detectors: list[str]
    image_ids: dict[str, np.ndarray]
    scores: dict[str, dict[str, np.ndarray]]

    @property
    def ood_sets(self) -> list[str]:
        return [name for name in self.image_ids if name != self.id_set]


@dataclass(frozen=True)
class ExperimentResult:
    """A finished run: the config it ran, its rows and averages, the per-image scores, the ID accuracy (percent),
    what it ran with (provenance: versions, device, git state, skipped and broken images) and notes for readers."""

    config: ExperimentConfig
    rows: tuple[ResultRow, ...]
    averages: tuple[AverageRow, ...]
    scores: RunScores
    id_accuracy: float
    provenance: Mapping[str, Any]
    notes: tuple[str, ...] = ()
