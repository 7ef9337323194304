"""Sweeps from the cache: `--set detectors.nnguide.k=1,5,10` (or `bank_ratio=0.01,0.05`) runs the experiment
once per value, re-using every cached feature, and writes one table of the metrics against the value. A sweep over
the bank's seed (`--set seed=0,1,2,3,4`) also summarises each number's spread over the draws (seed-summary.md)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from errors import UserError
from ood_evaluation.definitions import BY_NAME
from pipeline.config.experiment import resolve_experiment
from pipeline.files import require_writable, write_atomically
from pipeline.report.outputs import check_output_dir, write_result
from pipeline.report.rows import RESULTS_METRICS, SWEEP_FILE
from pipeline.report.tables import (TABLE_METRICS, format_markdown, format_terminal, has_interval, intervals_legend,
                                    paper_table)
from pipeline.result import ResultRow
from pipeline.run.experiment import run_experiment


def split_sweep(overrides: list[str]) -> tuple[str, list[str], list[str]] | None:
    """(key, values, the other overrides) when one override lists comma-separated values, else None."""
    sweeps = [override for override in overrides
              if "," in override.partition("=")[2] and not override.partition("=")[2].lstrip().startswith(("[", "{"))]
    if not sweeps:
        return None
    if len(sweeps) > 1:
        raise UserError(f"one swept key at a time, got {len(sweeps)}: {', '.join(sweeps)}")
    key, _, values = sweeps[0].partition("=")
    return key, [value.strip() for value in values.split(",")], [o for o in overrides if o != sweeps[0]]


def run_sweep(experiment_file: Path | None, flags: dict[str, Any], overrides: list[str]) -> tuple[str, Path]:
    """Run every value of the swept key into <output_dir>/<key>=<value>/; write sweep.csv and sweep.md. The
    default output_dir is logs/<model>/<ID set>/sweep-<key>, apart from that pair's own results.

    Returns the terminal table and the path of sweep.csv."""
    key, values, others = split_sweep(overrides)
    # resolve every value first, so a bad one fails before anything runs
    experiments = [resolve_experiment(experiment_file, flags, [*others, f"{key}={value}"],
                                      default_subfolder=f"sweep-{key}") for value in values]
    swept_detector = key.split(".")[1] if key.startswith("detectors.") and key.count(".") >= 2 else None
    output_root = Path(experiments[0].config.output_dir)
    for value, experiment in zip(values, experiments):
        check_output_dir(experiment, output_root / f"{key}={value}")
    require_writable(output_root, "output directory (--output-dir)")
    table: list[list[str]] = []
    csv_lines = [f"{key},ood_data,detector,auroc,fpr95"]
    rows_by_value: dict[str, Sequence[ResultRow]] = {}
    for number, (value, experiment) in enumerate(zip(values, experiments)):
        config = experiment.config
        detectors = ({swept_detector: config.detectors[swept_detector]} if swept_detector else config.detectors)
        result = run_experiment(experiment.replace(  # re-extract once, not per value
            detectors=detectors, output_dir=str(output_root / f"{key}={value}"),
            recompute=config.recompute and number == 0))
        if result is None:  # a torchrun rank other than 0: it only helps extract
            continue
        write_result(result)
        header, *lines = paper_table(result.rows)
        table = table or [[key, *header]]
        table += [[value, *line] for line in lines]
        csv_lines += [f"{value},{row.ood_data},{row.detector},{row.metrics['auroc']!r},{row.metrics['fpr95']!r}"
                      for row in result.rows]
        rows_by_value[value] = result.rows
    if not rows_by_value:
        return "", output_root / SWEEP_FILE
    write_atomically(output_root / SWEEP_FILE, lambda path: path.write_text("\n".join(csv_lines) + "\n"))
    below = (f"\n{intervals_legend(f'{100 * experiments[0].config.ci_level:g}%')}\n"
             if any(has_interval(cell) for line in table[1:] for cell in line) else "")
    write_atomically(output_root / "sweep.md", lambda path: path.write_text(format_markdown(table) + below))
    terminal = format_terminal(table) + below.rstrip("\n")
    if key == "seed":  # a bank-seed sweep: how far each number moves with another draw of the bank
        summary, numbers = seed_summary(rows_by_value)
        spread = (f"mean ± population standard deviation [min, max] over the bank seeds {', '.join(values)}, in "
                  f"percent: the spread over draws of the bank, not a bootstrap interval.")
        write_atomically(output_root / "seed-summary.md", lambda path: path.write_text(
            f"{format_markdown(summary)}\n{spread}\n"))
        write_atomically(output_root / "seed-summary.csv", lambda path: path.write_text(numbers))
        terminal += f"\n\n{format_terminal(summary)}\n{spread}"
    return terminal, output_root / SWEEP_FILE


# the seed summary's metrics: the table's two first, then the rest of results.csv's
SUMMARY_METRICS = (*TABLE_METRICS, *[metric for metric in RESULTS_METRICS if metric not in TABLE_METRICS])


def seed_summary(rows_by_seed: dict[str, Sequence[ResultRow]]) -> tuple[list[list[str]], str]:
    """Per (OOD set, detector) over the seeds' runs: a table of FPR95 and AUROC as mean ± population std [min, max],
    and CSV text with every metric's mean, std, min and max (percent, full precision)."""
    collected: dict[tuple[str, str], dict[str, list[float]]] = {}
    for rows in rows_by_seed.values():
        for row in rows:
            per_metric = collected.setdefault((row.ood_data, row.detector), {})
            for metric in SUMMARY_METRICS:
                per_metric.setdefault(metric, []).append(row.metrics[metric])
    table = [["OOD set", "Detector", *[BY_NAME[metric].title for metric in TABLE_METRICS]]]
    csv_lines = ["ood_data,detector,seeds," + ",".join(f"{metric}_{statistic}" for metric in SUMMARY_METRICS
                                                       for statistic in ("mean", "std", "min", "max"))]
    for (ood_data, detector), per_metric in collected.items():
        table.append([ood_data, detector, *[f"{np.mean(per_metric[metric]):.2f} ± {np.std(per_metric[metric]):.2f} "
                                            f"[{min(per_metric[metric]):.2f}, {max(per_metric[metric]):.2f}]"
                                            for metric in TABLE_METRICS]])
        statistics = [statistic(per_metric[metric]) for metric in SUMMARY_METRICS
                      for statistic in (np.mean, np.std, np.min, np.max)]
        csv_lines.append(f"{ood_data},{detector},{len(per_metric['auroc'])},"
                         + ",".join(repr(float(value)) for value in statistics))
    return table, "\n".join(csv_lines) + "\n"
