"""Is detector A better than detector B on this run? Paired bootstrap differences from the run's stored scores.

    python -m pipeline.tools.compare logs/resnet50-supcon/imagenet1k nnguide knn [--metrics auroc fpr95]

For each OOD set and for the average over the sets: A's and B's metric, the difference A - B with its paired
bootstrap interval (the same resampled images for both detectors) and the fraction of resamples in which A is
better. All lines come from one set of resamples (bootstrap_sets_distribution, the scheme of a run's own
intervals): each draws the ID images once and each OOD set separately, and the average averages the sets'
differences within each resample. The intervals cover the sampling of the test images only: not other draws of
the bank, nor other choices of OOD sets.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from errors import UserError, did_you_mean
from ood_evaluation.bootstrap import METRICS, bootstrap_sets_distribution, check_cost, paired_differences
from ood_evaluation.metrics import ood_metrics
from pipeline.report.tables import format_terminal
from pipeline.report.scores import read_scores
from pipeline.result import RunScores


def compare(stored: RunScores, a: str, b: str, metrics: list[str], resamples: int = 1000, seed: int = 0,
            level: float = 0.95) -> list[list[str]]:
    """Header + per metric, one line per OOD set and one for their average: A, B, A - B, its interval, P(A better)."""
    for name in (a, b):
        if name not in stored.detectors:
            raise UserError(f"detector '{name}' is not in this run{did_you_mean(name, stored.detectors)}; "
                            f"its detectors: {', '.join(stored.detectors)}")
    points, distributions = {}, {}
    for detector in (a, b):  # the same sizes and seed: the same resamples for both (paired)
        id_scores = stored.scores[stored.id_set][detector]
        ood_scores = [stored.scores[name][detector] for name in stored.ood_sets]
        points[detector] = np.array([[metrics[metric] for metric in METRICS]
                                     for metrics in (ood_metrics(id_scores, scores) for scores in ood_scores)])
        distributions[detector] = bootstrap_sets_distribution(id_scores, ood_scores, resamples, seed)
    differences = distributions[a] - distributions[b]  # (resamples, sets, metrics)
    lines = {name: (points[a][index], points[b][index], differences[:, index])
             for index, name in enumerate(stored.ood_sets)}
    lines["Average"] = (points[a].mean(axis=0), points[b].mean(axis=0), differences.mean(axis=1))
    paired = {name: paired_differences(resampled, dict(zip(METRICS, point_a - point_b)), level)
              for name, (point_a, point_b, resampled) in lines.items()}
    table = [["Metric", "OOD set", a, b, f"{a} - {b}", f"{100 * level:g}% interval", f"P({a} better)"]]
    for metric in metrics:
        column = METRICS.index(metric)
        for name, (point_a, point_b, _) in lines.items():
            difference = paired[name][metric]
            table.append([metric, name, f"{100 * point_a[column]:.2f}", f"{100 * point_b[column]:.2f}",
                          f"{100 * difference.difference:+.2f}",
                          f"[{100 * difference.low:+.2f}, {100 * difference.high:+.2f}]", f"{difference.a_better:.3f}"])
    return table


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
        if args.resamples < 1 or not 0 < args.level < 1 or args.seed < 0:
            raise UserError(f"--resamples must be positive, --level in (0, 1) and --seed zero or more, got "
                            f"{args.resamples}, {args.level} and {args.seed}")
        stored = read_scores(args.run_dir)
        try:  # two detectors' resamples
            check_cost(args.resamples, len(stored.image_ids[stored.id_set]),
                           [len(stored.image_ids[name]) for name in stored.ood_sets], repeats=2)
        except ValueError as error:
            raise UserError(f"--resamples: {error}") from None
        table = compare(stored, args.a, args.b, args.metrics, args.resamples, args.seed, args.level)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_terminal(table))
    print(f"\nMetrics in percent; the intervals cover the sampling of the test images ({args.resamples} paired "
          f"resamples), not other bank draws nor other OOD sets.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
