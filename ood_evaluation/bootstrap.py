"""Bootstrap confidence intervals for every metric of `ood_metrics`, and paired differences between two detectors.

    intervals = bootstrap_metrics(id_scores, ood_scores)        # {"auroc": (low, high), ...}: 95%, 1000 resamples
    paired = paired_bootstrap(id_a, ood_a, id_b, ood_b)        # {"auroc": PairedDifference(...), ...}: a - b
    averaged = bootstrap_averages(id_scores, {"inat": ood_1, "sun": ood_2}, [("inat", "sun")])
    # {("inat",): {...}, ("sun",): {...}, ("inat", "sun"): {"auroc": (low, high), ...}}

Scores are (N,) arrays, higher = more in-distribution; metrics and intervals are fractions in [0, 1]. The
bootstrap is stratified: each resample draws the ID scores and the OOD scores separately, each with replacement
to its own size, so the intervals cover the sampling of test images only (the bank, the model, the
hyper-parameters and the choice of OOD set are held fixed). Intervals are percentile intervals: the
(1 - level) / 2 and (1 + level) / 2 quantiles of the resampled metrics.

Several OOD sets share one set of resamples (bootstrap_sets_distribution): each resample draws the ID images
once and each OOD set separately, so every set's interval is still a stratified bootstrap of that set, and an
average over sets is bootstrapped by averaging the sets' metrics within each resample. The draws depend only on
the sizes, the number of resamples and the seed: two detectors scored on the same images get the same resamples
(paired). The first OOD set's draws are those of a single-set bootstrap with that seed; the draws themselves are
`ood_evaluation.resampling.sets_resample_counts`.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ood_evaluation.definitions import METRIC_NAMES, METRICS as _DEFINITIONS
from ood_evaluation.metrics import as_scores, ood_metrics
from ood_evaluation.resampling import sets_distribution

ArrayLike = Any  # an (N,) numpy array, sequence or torch tensor of scores

METRICS = METRIC_NAMES  # the distributions' columns, in ood_metrics' order
HIGHER_IS_BETTER = {metric.name: metric.higher_is_better for metric in _DEFINITIONS}
SECONDS_PER_DRAW = 2.5e-8  # one score drawn in one resample, metrics included: 1,000 x (50,000 + 10,000) in 1.3-1.5 s


@dataclass(frozen=True)
class PairedDifference:
    """Metric of detector a minus detector b: on the given scores, and its paired bootstrap interval. a_better and
    tied are fractions of resamples: a better (higher, or lower for the FPRs) than b, and exactly equal."""
    difference: float
    low: float
    high: float
    a_better: float
    tied: float


def bootstrap_metrics(id_scores: ArrayLike, ood_scores: ArrayLike, resamples: int = 1000, seed: int = 0,
                      level: float = 0.95) -> dict[str, tuple[float, float]]:
    """{metric: (low, high)}: the percentile interval at `level` of each ood_metrics metric over `resamples`
    stratified bootstrap resamples (ID and OOD scores each drawn with replacement to their own size).

    id_scores (N,), ood_scores (M,): higher = more in-distribution, numpy or torch, checked as ood_metrics checks
    them. The same seed gives the same intervals (numpy's default Generator, seeded through SeedSequence(seed)).
    """
    _check_level(level)
    distribution = sets_distribution(as_scores(id_scores, "id_scores"), [as_scores(ood_scores, "ood_scores")],
                                     resamples, seed)
    return _percentile_intervals(distribution[:, 0], level)


def bootstrap_sets_distribution(id_scores: ArrayLike, ood_scores: Sequence[ArrayLike], resamples: int = 1000,
                                seed: int = 0) -> np.ndarray:
    """The metrics of each resample on each OOD set: array of shape (resamples, sets, 6), METRICS order last.

    Each resample draws the ID scores once for all sets and each OOD set separately (all with replacement, each
    to its own size): [r, s] is ood_metrics of the scores repeated by row r of the ID counts and set s's counts
    of `ood_evaluation.resampling.sets_resample_counts`. Set 0's draws do not depend on the other sets.
    """
    if not ood_scores:
        raise ValueError("ood_scores is empty: give at least one OOD set's scores")
    return sets_distribution(as_scores(id_scores, "id_scores"),
                             [as_scores(scores, f"ood_scores[{index}]") for index, scores in enumerate(ood_scores)],
                             resamples, seed)


def bootstrap_averages(id_scores: ArrayLike, ood_scores: Mapping[str, ArrayLike], averages: Iterable[Sequence[str]],
                       resamples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> dict[tuple[str, ...], dict[str, tuple[float, float]]]:
    """{sets: {metric: (low, high)}}: the percentile interval of each OOD set alone, keyed (name,), and of each
    average over the named sets in `averages`, all from one bootstrap_sets_distribution of the sets in order.

    An average's resampled metric is the mean of its sets' metrics within each resample, so it varies with the
    ID images the sets share; its interval costs nothing beyond the sets' own.
    """
    _check_level(level)
    names = list(ood_scores)
    distribution = bootstrap_sets_distribution(id_scores, list(ood_scores.values()), resamples, seed)
    groups = [(name,) for name in names] + [tuple(sets) for sets in averages]
    unknown = sorted({name for group in groups for name in group} - set(names))
    if unknown:
        raise ValueError(f"averages name OOD sets without scores: {unknown}")
    return {group: _percentile_intervals(distribution[:, [names.index(name) for name in group]].mean(axis=1), level)
            for group in groups}


def paired_bootstrap(id_a: ArrayLike, ood_a: ArrayLike, id_b: ArrayLike, ood_b: ArrayLike, resamples: int = 1000,
                     seed: int = 0, level: float = 0.95) -> dict[str, PairedDifference]:
    """Detector a minus detector b, each metric, with a paired bootstrap interval at `level`.

    id_a[i] and id_b[i] score the same ID image (likewise ood_a and ood_b), so each resample draws images and
    applies the same counts to both detectors' scores (the same seed). `difference` is ood_metrics(a) -
    ood_metrics(b) on the given scores. A detector against itself gives exactly zero intervals, a_better = 0 and
    tied = 1.
    """
    _check_level(level)
    id_a, ood_a = as_scores(id_a, "id_a"), as_scores(ood_a, "ood_a")
    id_b, ood_b = as_scores(id_b, "id_b"), as_scores(ood_b, "ood_b")
    for what, size_a, size_b in (("id", id_a.size, id_b.size), ("ood", ood_a.size, ood_b.size)):
        if size_a != size_b:
            raise ValueError(f"{what}_a has {size_a} scores and {what}_b {size_b}: paired scores must score the "
                             "same images, in the same order")
    differences = (sets_distribution(id_a, [ood_a], resamples, seed)
                   - sets_distribution(id_b, [ood_b], resamples, seed))[:, 0]
    point_a, point_b = ood_metrics(id_a, ood_a), ood_metrics(id_b, ood_b)
    return paired_differences(differences, {name: point_a[name] - point_b[name] for name in METRICS}, level)


def paired_differences(differences: np.ndarray, point_differences: Mapping[str, float],
                       level: float = 0.95) -> dict[str, PairedDifference]:
    """Each metric's PairedDifference from resampled differences a - b (resamples, 6), METRICS order, and the
    differences on the given scores: the percentile interval at `level`, the fraction of resamples where a is
    strictly better (higher, or lower for the FPRs) and where the two are equal (ties are not wins)."""
    _check_level(level)
    intervals = _percentile_intervals(differences, level)
    result = {}
    for column, name in enumerate(METRICS):
        sign = 1.0 if HIGHER_IS_BETTER[name] else -1.0
        result[name] = PairedDifference(difference=point_differences[name], low=intervals[name][0],
                                        high=intervals[name][1],
                                        a_better=float(np.mean(sign * differences[:, column] > 0)),
                                        tied=float(np.mean(differences[:, column] == 0)))
    return result


def check_cost(resamples: int, id_size: int, ood_sizes: Sequence[int], repeats: int = 1,
               limit_seconds: float = 3600, limit_bytes: float = 2 ** 31) -> None:
    """Raise a ValueError, with the estimate, when `repeats` bootstrap_sets_distribution calls of these sizes would
    take over `limit_seconds` on one core (about 25 ns per drawn score: docs/benchmarks.md, "Bootstrap intervals")
    or hold over `limit_bytes` of resampled metrics at once (48 bytes per resample and set, three such arrays for
    a paired comparison): a request that would take hours or exhaust memory is refused before it starts."""
    seconds = SECONDS_PER_DRAW * resamples * sum(id_size + size for size in ood_sizes) * repeats
    if seconds > limit_seconds:
        raise ValueError(f"{resamples} resamples of {id_size} ID and {sum(ood_sizes)} OOD scores would take about "
                         f"{seconds / 3600:.1f} hours on one core; ask for fewer")
    held = 3 * resamples * len(ood_sizes) * len(METRICS) * 8
    if held > limit_bytes:
        raise ValueError(f"{resamples} resamples of {len(ood_sizes)} OOD sets would hold about {held / 2 ** 30:.1f} "
                         f"GiB of resampled metrics; ask for fewer")


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")


def _percentile_intervals(distribution: np.ndarray, level: float) -> dict[str, tuple[float, float]]:
    """(low, high) per METRICS column: the (1 - level) / 2 and (1 + level) / 2 quantiles (numpy's linear rule)."""
    bounds = np.quantile(distribution, [(1 - level) / 2, (1 + level) / 2], axis=0)   # (2, 6)
    return {name: (float(bounds[0, column]), float(bounds[1, column])) for column, name in enumerate(METRICS)}
