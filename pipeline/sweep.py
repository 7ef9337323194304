"""Sweeps from the cache: `--set detectors.nnguide.k=1,5,10` (or `bank_ratio=0.01,0.05`) runs the experiment
once per value, re-using every cached feature, and writes one table of the metrics against the value."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from errors import UserError
from pipeline.cache import write_atomically
from pipeline.config import resolve_experiment
from pipeline.experiment import run_experiment
from pipeline.report import format_markdown, format_terminal, paper_table


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
    configs = [resolve_experiment(experiment_file, flags, [*others, f"{key}={value}"], default_subfolder=f"sweep-{key}")
               for value in values]
    swept_detector = key.split(".")[1] if key.startswith("detectors.") and key.count(".") >= 2 else None
    output_root = Path(configs[0].output_dir)
    table: list[list[str]] = []
    csv_lines = [f"{key},ood_data,detector,auroc,fpr95"]
    for number, (value, config) in enumerate(zip(values, configs)):
        detectors = ({swept_detector: config.detectors[swept_detector]} if swept_detector else config.detectors)
        config = dataclasses.replace(config, detectors=detectors, output_dir=str(output_root / f"{key}={value}"),
                                     recompute=config.recompute and number == 0)  # re-extract once, not per value
        rows, _ = run_experiment(config)
        header, *lines = paper_table(rows)
        table = table or [[key, *header]]
        table += [[value, *line] for line in lines]
        csv_lines += [f"{value},{row['ood_data']},{row['detector']},{row['auroc']!r},{row['fpr95']!r}"
                      for row in rows]
    write_atomically(output_root / "sweep.csv", lambda path: path.write_text("\n".join(csv_lines) + "\n"))
    write_atomically(output_root / "sweep.md", lambda path: path.write_text(format_markdown(table)))
    return format_terminal(table), output_root / "sweep.csv"
