"""Is detector A better than detector B on this run? Paired bootstrap differences from the run's stored scores.

    python -m pipeline.compare logs/resnet50-supcon/imagenet1k nnguide knn [--metrics auroc fpr95] [--resamples 1000]

For each OOD set and for the average over the sets: A's and B's metric, the difference A - B with its paired
bootstrap interval (the same resampled images for both detectors) and the fraction of resamples in which A is
better. The average's resamples draw the ID images once and each OOD set separately, and average the sets'
differences within each resample. The intervals cover the sampling of the test images only: not other draws of
the bank, nor other choices of OOD sets.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from errors import UserError, did_you_mean
from ood_detectors.bootstrap import HIGHER_IS_BETTER, METRICS, CountedScores, paired_bootstrap
from ood_detectors.metrics import ood_metrics
from pipeline.report import format_terminal
from pipeline.scores import RunScores, read_scores

RESAMPLES_PER_BLOCK = 100  # of the average's resamples held at once: counts are (block, images) int64


def compare(stored: RunScores, a: str, b: str, metrics: list[str], resamples: int = 1000, seed: int = 0,
            level: float = 0.95) -> list[list[str]]:
    """Header + per metric, one line per OOD set and one for their average: A, B, A - B, its interval, P(A better)."""
    for name in (a, b):
        if name not in stored.detectors:
            raise UserError(f"detector '{name}' is not in this run{did_you_mean(name, stored.detectors)}; "
                            f"its detectors: {', '.join(stored.detectors)}")
    id_a, id_b = stored.scores[stored.id_set][a], stored.scores[stored.id_set][b]
    points = {name: (ood_metrics(id_a, stored.scores[name][a]), ood_metrics(id_b, stored.scores[name][b]))
              for name in stored.ood_sets}
    per_set = {name: paired_bootstrap(id_a, stored.scores[name][a], id_b, stored.scores[name][b], resamples, seed,
                                      level) for name in stored.ood_sets}
    average = _average_difference(stored, a, b, resamples, seed, level)
    table = [["Metric", "OOD set", a, b, f"{a} - {b}", f"{100 * level:g}% interval", f"P({a} better)"]]
    for metric in metrics:
        for name in stored.ood_sets:
            paired = per_set[name][metric]
            table.append(_line(metric, name, points[name][0][metric], points[name][1][metric], paired.low,
                               paired.high, paired.a_better))
        low, high, a_better = average[metric]
        table.append(_line(metric, "Average", np.mean([points[name][0][metric] for name in stored.ood_sets]),
                           np.mean([points[name][1][metric] for name in stored.ood_sets]), low, high, a_better))
    return table


def _line(metric: str, name: str, point_a: float, point_b: float, low: float, high: float,
          a_better: float) -> list[str]:
    return [metric, name, f"{100 * point_a:.2f}", f"{100 * point_b:.2f}", f"{100 * (point_a - point_b):+.2f}",
            f"[{100 * low:+.2f}, {100 * high:+.2f}]", f"{a_better:.3f}"]


def _average_difference(stored: RunScores, a: str, b: str, resamples: int, seed: int,
                        level: float) -> dict[str, tuple[float, float, float]]:
    """Per metric: the percentile interval of A - B averaged over the OOD sets, and the fraction of resamples
    where A is better, each resample drawing the ID images once for all sets."""
    id_a, id_b = stored.scores[stored.id_set][a], stored.scores[stored.id_set][b]
    prepared = {name: (CountedScores(id_a, stored.scores[name][a]), CountedScores(id_b, stored.scores[name][b]))
                for name in stored.ood_sets}
    rng = np.random.default_rng(seed)
    differences = np.empty((resamples, len(METRICS)))
    for start in range(0, resamples, RESAMPLES_PER_BLOCK):
        rows = min(RESAMPLES_PER_BLOCK, resamples - start)
        id_counts = rng.multinomial(id_a.size, np.full(id_a.size, 1 / id_a.size), size=rows)
        block = np.zeros((rows, len(METRICS)))
        for name, (scores_a, scores_b) in prepared.items():
            size = stored.scores[name][a].size
            ood_counts = rng.multinomial(size, np.full(size, 1 / size), size=rows)
            block += scores_a.metrics(id_counts, ood_counts) - scores_b.metrics(id_counts, ood_counts)
        differences[start:start + rows] = block / len(prepared)
    tail = 100 * (1 - level) / 2
    result = {}
    for column, metric in enumerate(METRICS):
        low, high = np.percentile(differences[:, column], [tail, 100 - tail])
        sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
        result[metric] = (float(low), float(high), float(np.mean(sign * differences[:, column] > 0)))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Paired bootstrap comparison of two detectors of one run, from "
                                                 "its scores.npz.")
    parser.add_argument("run_dir", type=Path, help="a run's output folder (holding scores.npz)")
    parser.add_argument("a", help="detector A (a table name of the run)")
    parser.add_argument("b", help="detector B")
    parser.add_argument("--metrics", nargs="+", default=["auroc", "fpr95"], choices=METRICS,
                        help="metrics to compare (default: auroc fpr95)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default: 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the resampling (default: 0)")
    parser.add_argument("--level", type=float, default=0.95, help="interval level (default: 0.95)")
    args = parser.parse_args(argv)
    try:
        if args.resamples < 1 or not 0 < args.level < 1:
            raise UserError(f"--resamples must be positive and --level in (0, 1), got {args.resamples} and "
                            f"{args.level}")
        table = compare(read_scores(args.run_dir), args.a, args.b, args.metrics, args.resamples, args.seed,
                        args.level)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_terminal(table))
    print(f"\nMetrics in percent; the intervals cover the sampling of the test images ({args.resamples} paired "
          f"resamples), not other bank draws nor other OOD sets.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
