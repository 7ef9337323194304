"""Results as a paper-style table (terminal and markdown), results.csv, averages.csv, and the resolved config.

A run's result files are replaced as one set (`replace_result_files`): the output folder never holds two runs'
files at once, and `results-manifest.json`, written last, lists the complete set.
"""
from __future__ import annotations

import csv
import datetime
import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline.averages import paper_averages
from pipeline.cache import exclusive_lock, full_disk_is_a_user_error, remove_unfinished_files, write_atomically

log = logging.getLogger(__name__)

MISSING = "-"
INTERVAL_METRICS = ("auroc", "fpr95", "aupr_in", "aupr_out", "dtacc")  # results.csv's, each with _ci_low, _ci_high
CSV_COLUMNS = ["model", "train_data", "id_data", "ood_data", "detector", "auroc", "fpr95", "aupr_in",
               "aupr_out", "dtacc", "id_acc", "checkpoint",
               *[f"{metric}_ci_{end}" for metric in INTERVAL_METRICS for end in ("low", "high")]]
# results_openood.csv, beside results.csv: the same runs with FPR95 in OpenOOD's convention (OOD positive)
OPENOOD_FILE = "results_openood.csv"
OPENOOD_COLUMNS = ["model", "train_data", "id_data", "ood_data", "detector", "auroc", "fpr95_ood_positive",
                   "aupr_in", "aupr_out", "id_acc", "checkpoint",
                   *[f"{metric}_ci_{end}" for metric in ("auroc", "fpr95_ood_positive", "aupr_in", "aupr_out")
                     for end in ("low", "high")]]
# averages.csv, beside results.csv: per detector, each average over OOD sets the run bootstrapped (run_averages),
# its metrics (the mean of the sets', in percent) each with the interval of that mean; ood_sets joined by ";"
AVERAGES_FILE = "averages.csv"
# ood_metrics' keys, as ood_detectors.bootstrap.METRICS (restated: this module imports no torch; a test compares)
OOD_METRICS = ("auroc", "fpr95", "aupr_in", "aupr_out", "dtacc", "fpr95_ood_positive")
AVERAGE_COLUMNS = ["model", "train_data", "id_data", "detector", "average", "ood_sets",
                   *[f"{metric}{end}" for metric in OOD_METRICS for end in ("", "_ci_low", "_ci_high")],
                   "checkpoint"]
OOD_SETS_SEPARATOR = ";"
# the output folder's record of its result files: {"complete": bool, "files": {name: sha256}, "written": ISO UTC}
RESULTS_MANIFEST = "results-manifest.json"
# the keys of config.yaml that make a run another run: its results are not comparable rows of the same table
RUN_IDENTITY = ("model", "train_data", "id_data", "ood_data", "detectors")
_STAGING = ".results-staging"     # a run's files before they are renamed in; a killed run's is removed by the next
_RESULTS_LOCK = ".results.lock"   # exclusive_lock: one run at a time stages and replaces a folder's results


TABLE_METRICS = ("fpr95", "auroc")  # the paper's columns per OOD set, in order
TABLE_METRIC_TITLES = {"fpr95": "FPR95", "auroc": "AUROC"}
Cell = float | None  # a metric in percent; None where a result is missing
# A table before formatting: its header, and per line the label cells and the numbers
NumericTable = tuple[list[str], list[tuple[list[str], list[Cell]]]]
# (detector, the OOD sets of a cell: one, or those averaged) -> {metric: (ci_low, ci_high)} in percent
Intervals = dict[tuple[str, frozenset[str]], dict[str, tuple[float, float]]]


def mean_cells(results: list[dict[str, Any] | None], metrics: tuple[str, ...]) -> list[Cell]:
    """Each metric averaged over `results`; None when any result is missing."""
    if not all(results):
        return [None] * len(metrics)
    return [sum(row[metric] for row in results) / len(results) for metric in metrics]


def paper_table_numbers(rows: list[dict[str, Any]], ood_sets: list[str] | None = None,
                        detectors: list[str] | None = None) -> NumericTable:
    """One line per detector: FPR95 and AUROC per OOD set, then the averages; sets and detectors in first-seen
    order unless given (replicates of a run share the union's columns).

    Avg-4 is the paper's Average (iNaturalist, SUN, Places, Textures), shown when all four are present;
    Avg-all averages every OOD set. A missing result, and any average needing it, is None."""
    ood_sets = ood_sets or list(dict.fromkeys(row["ood_data"] for row in rows))
    detectors = detectors or list(dict.fromkeys(row["detector"] for row in rows))
    cells = {(row["detector"], row["ood_data"]): row for row in rows}
    columns = paper_columns(ood_sets)
    header = ["Detector"] + [f"{label} {TABLE_METRIC_TITLES[metric]}" for label in columns for metric in TABLE_METRICS]
    lines = []
    for detector in detectors:
        numbers: list[Cell] = []
        for names in columns.values():
            numbers += mean_cells([cells.get((detector, name)) for name in names], TABLE_METRICS)
        lines.append(([detector], numbers))
    return header, lines


def paper_columns(ood_sets: list[str]) -> dict[str, tuple[str, ...]]:
    """The paper table's column groups, {label: the OOD sets averaged}: each set alone, then paper_averages."""
    return {**{name: (name,) for name in ood_sets}, **paper_averages(ood_sets)}


def format_table(replicates: list[NumericTable]) -> list[list[str]]:
    """Header + lines of strings: each cell two decimals, or with several replicates (runs of one model's
    checkpoints) their mean ± population std, as OpenOOD reports its three checkpoints; "-" where any is missing."""
    header, lines = replicates[0]
    if any(other[0] != header or [labels for labels, _ in other[1]] != [labels for labels, _ in lines]
           for other in replicates[1:]):
        raise ValueError("replicate tables must share their header and line labels")
    table = [header]
    for index, (labels, _) in enumerate(lines):
        cells = []
        for column in range(len(lines[index][1])):
            values = [replicate[1][index][1][column] for replicate in replicates]
            if any(value is None for value in values):
                cells.append(MISSING)
            elif len(values) == 1:
                cells.append(f"{values[0]:.2f}")
            else:
                cells.append(f"{np.mean(values):.2f} ± {np.std(values):.2f}")
        table.append([*labels, *cells])
    return table


def paper_table(rows: list[dict[str, Any]], averages: Sequence[dict[str, Any]] = ()) -> list[list[str]]:
    """Header + one line per detector: `paper_table_numbers` of one run, two decimals, "-" where missing; a
    cell with a bootstrap interval (a row's, or for an average the `averages` row of its sets) shows
    "value ± half its width"."""
    table = format_table([paper_table_numbers(rows)])
    add_paper_intervals(table, list(dict.fromkeys(row["ood_data"] for row in rows)), interval_index(rows, averages))
    return table


def add_paper_intervals(table: list[list[str]], ood_sets: list[str], intervals: Intervals) -> None:
    """Append "± half the interval's width" to each cell of a one-run paper table (columns `paper_columns(
    ood_sets)`) whose (detector, sets) has an interval."""
    for line in table[1:]:
        for group, sets in enumerate(paper_columns(ood_sets).values()):
            found = intervals.get((line[0], frozenset(sets)), {})
            for offset, metric in enumerate(TABLE_METRICS):
                column = 1 + len(TABLE_METRICS) * group + offset
                line[column] = with_interval(line[column], found.get(metric))


def with_interval(cell: str, interval: tuple[float, float] | None) -> str:
    """A formatted cell with " ± half the interval's width" appended; unchanged without one or where missing."""
    return cell if interval is None or cell == MISSING else f"{cell} ± {(interval[1] - interval[0]) / 2:.2f}"


def interval_index(rows: list[dict[str, Any]], averages: Sequence[dict[str, Any]] = ()) -> Intervals:
    """Each row's intervals under (detector, {its OOD set}), and each averages.csv row's under (detector, its
    sets) where the rows of those sets all come from its run (the same `source`, or none in a run's own)."""
    index = {(row["detector"], frozenset([row["ood_data"]])): _row_intervals(row) for row in rows}
    sources = {(row["detector"], row["ood_data"]): row.get("source") for row in rows}
    for average in averages:
        sets = average["ood_sets"].split(OOD_SETS_SEPARATOR)
        if all((average["detector"], name) in sources and sources[average["detector"], name] == average.get("source")
               for name in sets):
            index[(average["detector"], frozenset(sets))] = _row_intervals(average)
    return index


def _row_intervals(row: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """{metric: (ci_low, ci_high)} of the metrics the row has an interval for."""
    return {metric: (row[f"{metric}_ci_low"], row[f"{metric}_ci_high"]) for metric in OOD_METRICS
            if row.get(f"{metric}_ci_low") is not None}


def interval_columns(intervals: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    """A row's `<metric>_ci_low` and `_ci_high` columns in percent, from bootstrap intervals in fractions."""
    return {f"{metric}_ci_{end}": 100 * value for metric, interval in intervals.items()
            for end, value in zip(("low", "high"), interval)}


def average_row(rows: list[dict[str, Any]], average: str,
                intervals: Mapping[str, tuple[float, float]]) -> dict[str, Any]:
    """averages.csv's line for one detector's average over `rows` (its rows of the averaged OOD sets): the metrics
    averaged as the tables average them, and `intervals` (fractions, the bootstrap of that average) in percent."""
    first = rows[0]
    return {**{key: first[key] for key in ("model", "train_data", "id_data", "detector", "checkpoint")},
            "average": average, "ood_sets": OOD_SETS_SEPARATOR.join(row["ood_data"] for row in rows),
            **dict(zip(OOD_METRICS, mean_cells(rows, OOD_METRICS))), **interval_columns(intervals)}


def paper_table_legend(table: list[list[str]]) -> str:
    """What a `paper_table`'s columns mean; Avg-4 explained only where the table has it."""
    average_4 = ("Avg-4 (iNaturalist, SUN, Places, Textures) is the paper's Average; " if "Avg-4 FPR95" in table[0]
                 else "")
    return f"FPR95 (lower is better) and AUROC, in percent. {average_4}Avg-all averages every OOD column."


def format_markdown(table: list[list[str]]) -> str:
    lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" + "---:|" * (len(table[0]) - 1)]
    lines += ["| " + " | ".join(line) + " |" for line in table[1:]]
    return "\n".join(lines) + "\n"


def format_terminal(table: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    rendered = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
                for line in table]
    rendered.insert(1, "-" * len(rendered[0]))
    return "\n".join(rendered)


def _csv_text(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Rows as CSV text; floats at full precision (repr), so equal runs give byte-identical files."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: repr(value) if isinstance(value, float) else value for key, value in row.items()}
                     for row in rows)
    return buffer.getvalue()


def write_results(output_dir: Path, rows: list[dict[str, Any]], resolved_config: dict[str, Any],
                  provenance: dict[str, Any], extra_files: Mapping[str, Callable[[Path], Any]] | None = None,
                  notes: list[str] | None = None, averages: list[dict[str, Any]] | None = None) -> str:
    """Replace the folder's previous results with results.csv, results_openood.csv, results.md, config.yaml,
    averages.csv (when `averages`, average_row's, are given: their intervals also go into the tables) and
    `extra_files` ({file name: write(path)}, e.g. `score_plot_writers`), as one set; returns the terminal table.
    `notes` (e.g. that the sets are subsets) go above the table, in results.md and the terminal."""
    table = paper_table(rows, averages or ())
    first = rows[0]
    title = (f"# {first['model']}: ID {first['id_data']}, bank from {first['train_data']} "
             f"(ID accuracy {first['id_acc']:.2f}%)\n\n" + "".join(f"**{note}**\n\n" for note in notes or [])
             + f"{paper_table_legend(table)}\n\n")
    documents = {"results.csv": _csv_text(rows, CSV_COLUMNS), OPENOOD_FILE: _csv_text(rows, OPENOOD_COLUMNS),
                 "results.md": title + format_markdown(table),
                 "config.yaml": yaml.safe_dump({**resolved_config, "provenance": provenance}, sort_keys=False)}
    if averages is not None:
        documents[AVERAGES_FILE] = _csv_text(averages, AVERAGE_COLUMNS)
    writers = {name: (lambda path, text=text: path.write_text(text)) for name, text in documents.items()}
    clashing = set(writers) & set(extra_files or {})
    if clashing:
        raise ValueError(f"extra_files would replace the tables {sorted(clashing)}")
    previous = _run_identity_on_disk(Path(output_dir))
    replace_result_files(output_dir, {**writers, **(extra_files or {})})
    current = yaml.safe_load(yaml.safe_dump({key: resolved_config.get(key) for key in RUN_IDENTITY}))
    if previous is not None and previous != current:
        log.warning("%s held another run's results (model %s, ID %s, OOD %s, detectors %s); replaced them whole",
                    output_dir, previous.get("model", "?"), previous.get("id_data", "?"),
                    previous.get("ood_data", "?"), list(previous.get("detectors") or ["?"]))
    elif previous is not None:
        log.info("replaced the previous results of this run in %s", output_dir)
    return "".join(f"{note}\n" for note in notes or []) + format_terminal(table)


def _run_identity_on_disk(output_dir: Path) -> dict[str, Any] | None:
    """RUN_IDENTITY's values from the config.yaml of the results the folder holds; None without any."""
    if "config.yaml" not in _listed_files(output_dir):
        return None
    try:
        config = yaml.safe_load((output_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):  # removed or edited by hand: the results are replaced all the same
        return {}
    return {key: config.get(key) for key in RUN_IDENTITY} if isinstance(config, dict) else {}


def replace_result_files(output_dir: Path, writers: Mapping[str, Callable[[Path], Any]]) -> list[Path]:
    """Replace the files of the folder's previous run by `writers`' ({file name: write(path)}) as one set.

    Under the folder's lock, every file is first written into `.results-staging/`; then the manifest is marked
    incomplete (listing the old files and the new), the files it lists are removed, the new ones renamed in,
    and the manifest, written last, lists them with their sha256. The folder never holds two runs' files at
    once: a run killed while writing leaves the previous results whole (its staging folder is removed by the
    next run), one killed while renaming leaves a manifest saying "complete": false, whose files the next run
    removes. Files the manifest never listed (the user's own, a sweep's subfolders) are left alone."""
    for name in writers:
        if not _is_result_file_name(name):
            raise ValueError(f"result file name {name!r} is not a plain file name, or is the manifest's")
    output_dir = Path(output_dir)
    with exclusive_lock(output_dir / _RESULTS_LOCK, f"the results in {output_dir}"):
        staging = output_dir / _STAGING
        if staging.is_dir():
            remove_unfinished_files(staging, lambda name: True)
        staging.mkdir(exist_ok=True)
        checksums = {}
        for name, write in writers.items():  # the slow part (plots): the previous results stay whole meanwhile
            with full_disk_is_a_user_error(output_dir, name):  # the staging folder is private: no temporaries
                write(staging / f"{name}.part")
            checksums[name] = hashlib.sha256((staging / f"{name}.part").read_bytes()).hexdigest()
        replaced = _listed_files(output_dir) | set(writers)
        _write_manifest(output_dir, complete=False, files=dict.fromkeys(sorted(replaced)))
        for name in replaced:
            (output_dir / name).unlink(missing_ok=True)
        for name in writers:
            os.replace(staging / f"{name}.part", output_dir / name)
        _write_manifest(output_dir, complete=True, files=checksums)
        staging.rmdir()
    return [output_dir / name for name in writers]


def _is_result_file_name(name: str) -> bool:
    """A name within the folder (no separator, not '.' or '..'), not hidden (those are the writer's own) and
    not the manifest's."""
    return bool(name) and Path(name).name == name and not name.startswith(".") and name != RESULTS_MANIFEST


def _listed_files(output_dir: Path) -> set[str]:
    """The file names the folder's manifest lists (a previous run's, or every file an interrupted one may
    have left); none without a manifest. Only plain names: an edited manifest cannot reach outside."""
    manifest = output_dir / RESULTS_MANIFEST
    try:
        files = json.loads(manifest.read_text())["files"]
    except FileNotFoundError:
        return set()
    except (ValueError, KeyError, TypeError):  # ValueError: not JSON; KeyError, TypeError: not a manifest
        log.warning("%s is not a results manifest; the files it may list are left in place", manifest)
        return set()
    return {name for name in files if isinstance(name, str) and _is_result_file_name(name)}


def _write_manifest(output_dir: Path, complete: bool, files: dict[str, str | None]) -> None:
    written = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    manifest = {"complete": complete, "files": files, "written": written}
    write_atomically(output_dir / RESULTS_MANIFEST, lambda path: path.write_text(json.dumps(manifest, indent=1) + "\n"))
