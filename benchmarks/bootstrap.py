"""Time bootstrap intervals of all six OOD metrics on one CPU core, beside scikit-learn's metrics in a Python loop.

Synthetic scores of the paper's sizes (50,000 ImageNet validation images as ID, 10,000 OOD): ID ~ N(1, 1),
OOD ~ N(0, 1), optionally rounded to create ties. `ood_evaluation.bootstrap.bootstrap_metrics` computes all six
metrics of every resample from cumulative counts; the reference is `ood_metrics` (scikit-learn) on each
resample's expanded scores, timed on the first --sklearn-resamples resamples and extrapolated to all of them.
Both see the same resamples, and their metrics are checked to agree to 1e-9 (the script fails otherwise).
Every thread pool (OpenBLAS / MKL / OpenMP through threadpoolctl, torch's) is limited to one thread.
Usage: python benchmarks/bootstrap.py [--sizes 50000 10000] [--resamples 1000] [--sklearn-resamples 20] [--decimals 2]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_info, threadpool_limits  # scikit-learn's own dependency

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ood_evaluation.bootstrap import METRICS, bootstrap_metrics, bootstrap_sets_distribution  # noqa: E402
from ood_evaluation.metrics import ood_metrics  # noqa: E402
from ood_evaluation.resampling import sets_resample_counts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[50000, 10000], metavar=("ID", "OOD"),
                        help="scores: ID and OOD (default: ImageNet's 50,000 validation images and 10,000 OOD)")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--sklearn-resamples", type=int, default=20,
                        help="resamples scikit-learn computes (timed, then extrapolated; all of them are checked)")
    parser.add_argument("--decimals", type=int, default=None,
                        help="round the scores to this many decimals, so that many are tied (default: no rounding)")
    parser.add_argument("--repeats", type=int, default=3, help="the bootstrap's time is the best of this many runs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        run(args)


def run(args: argparse.Namespace) -> None:
    id_size, ood_size = args.sizes
    rng = np.random.default_rng(args.seed)
    id_scores, ood_scores = rng.normal(1.0, 1.0, id_size), rng.normal(0.0, 1.0, ood_size)
    if args.decimals is not None:
        id_scores, ood_scores = id_scores.round(args.decimals), ood_scores.round(args.decimals)
    distinct = np.unique(np.concatenate([id_scores, ood_scores])).size
    pools = ", ".join(sorted({f"{pool['internal_api']} {pool['num_threads']}" for pool in threadpool_info()}))
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; threads: torch "
          f"{torch.get_num_threads()}, {pools}; load average {os.getloadavg()[0]:.2f} (1 min)")
    print(f"numpy {np.__version__}; scores: {id_size} ID + {ood_size} OOD, {distinct} distinct values; "
          f"{args.resamples} resamples, all six metrics")

    seconds, cpu_seconds = [], []
    for _ in range(args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        intervals = bootstrap_metrics(id_scores, ood_scores, args.resamples, seed=args.seed)
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu_start)
    best = min(seconds)
    tracemalloc.start()
    distribution = bootstrap_sets_distribution(id_scores, [ood_scores], args.resamples, seed=args.seed)[:, 0]
    peak_bytes = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"bootstrap_metrics: {best:.3f} s (best of {args.repeats}; median {statistics.median(seconds):.3f} s, "
          f"CPU time {min(cpu_seconds):.3f} s), {1000 * best / args.resamples:.3f} ms per resample; "
          f"peak memory {peak_bytes / 2 ** 20:.1f} MiB (tracemalloc)")

    # scikit-learn on the first resamples: the distribution's rows, from the same counts.
    checked = min(args.sklearn_resamples, args.resamples)
    id_counts, (ood_counts,) = sets_resample_counts(id_size, [ood_size], checked, seed=args.seed)
    start = time.perf_counter()
    reference = np.array([[metrics[name] for name in METRICS] for metrics in (
        ood_metrics(np.repeat(id_scores, id_counts[row]), np.repeat(ood_scores, ood_counts[row]))
        for row in range(checked))])
    sklearn_seconds = (time.perf_counter() - start) / checked * args.resamples
    difference = np.abs(reference - distribution[:checked])
    print(f"scikit-learn (ood_metrics on expanded scores, a Python loop): "
          f"{sklearn_seconds / args.resamples * 1000:.1f} ms per resample, {sklearn_seconds:.1f} s for "
          f"{args.resamples} (extrapolated from {checked}); "
          f"speed-up {sklearn_seconds / best:.0f}x")
    print(f"max |bootstrap - scikit-learn| over {checked} resamples x 6 metrics: {difference.max():.2e} "
          f"(per metric: {', '.join(f'{name} {value:.1e}' for name, value in zip(METRICS, difference.max(axis=0)))})")
    print("95% intervals: " + ", ".join(f"{name} [{low:.4f}, {high:.4f}]" for name, (low, high) in intervals.items()))
    if difference.max() > 1e-9:
        raise SystemExit(f"bootstrap and scikit-learn disagree by {difference.max():.2e} > 1e-9")


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
