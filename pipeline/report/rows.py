"""The result files' rows: results.csv, results_openood.csv and averages.csv, their columns, and how ResultRows and
AverageRows are written to them and read back. Imports no numerical library: the offline tools read them."""
from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from errors import UserError
from ood_evaluation.definitions import METRIC_NAMES
from pipeline.report.manifest import check_against_manifest
from pipeline.result import AverageRow, ResultRow

RESULTS_FILE = "results.csv"
OPENOOD_FILE = "results_openood.csv"  # the same rows with FPR95 in OpenOOD's convention (OOD positive)
AVERAGES_FILE = "averages.csv"        # per detector, each average over OOD sets the run bootstrapped
SWEEP_FILE = "sweep.csv"              # a sweep's table, beside the folders of its runs (one per value)
RESULTS_METRICS = tuple(name for name in METRIC_NAMES if name != "fpr95_ood_positive")  # results.csv's, in order
OPENOOD_METRICS = ("auroc", "fpr95_ood_positive", "aupr_in", "aupr_out")  # results_openood.csv's: OpenOOD's four
IDENTITY_COLUMNS = ["model", "train_data", "id_data", "ood_data", "detector"]


def _interval_columns(metrics: Sequence[str]) -> list[str]:
    return [f"{metric}_ci_{end}" for metric in metrics for end in ("low", "high")]


CSV_COLUMNS = [*IDENTITY_COLUMNS, *RESULTS_METRICS, "id_acc", "checkpoint", *_interval_columns(RESULTS_METRICS)]
OPENOOD_COLUMNS = [*IDENTITY_COLUMNS, *OPENOOD_METRICS, "id_acc", "checkpoint", *_interval_columns(OPENOOD_METRICS)]
AVERAGE_COLUMNS = ["model", "train_data", "id_data", "detector", "average", "ood_sets",
                   *[f"{metric}{end}" for metric in METRIC_NAMES for end in ("", "_ci_low", "_ci_high")],
                   "checkpoint"]
OOD_SETS_SEPARATOR = ";"  # averages.csv's ood_sets column

def _record(row: ResultRow | AverageRow) -> dict[str, Any]:
    """A row's CSV fields: metrics and intervals as `<metric>`, `<metric>_ci_low` and `<metric>_ci_high`."""
    fields = {name: getattr(row, name) for name in ("model", "train_data", "id_data", "detector", "checkpoint")}
    if isinstance(row, ResultRow):
        fields.update(ood_data=row.ood_data, id_acc=row.id_acc)
    else:
        fields.update(average=row.label, ood_sets=OOD_SETS_SEPARATOR.join(row.ood_sets))
    fields.update(row.metrics)
    for metric, (low, high) in row.intervals.items():
        fields.update({f"{metric}_ci_low": low, f"{metric}_ci_high": high})
    return fields


def csv_text(rows: Sequence[ResultRow | AverageRow], columns: list[str]) -> str:
    """Rows as CSV text; floats at full precision (repr), so equal runs give byte-identical files."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: repr(value) if isinstance(value, float) else value for key, value in _record(row).items()}
                     for row in rows)
    return buffer.getvalue()


def _floats(record: dict[str, str], names: Sequence[str], where: str) -> dict[str, float]:
    """The named fields as floats; an empty or missing one is left out."""
    try:
        return {name: float(record[name]) for name in names if record.get(name)}
    except ValueError as error:
        raise UserError(f"{where}: a metric is not a number ({error})") from None


def read_rows(path: Path, openood: bool = False) -> list[ResultRow]:
    """The rows of a results.csv (results_openood.csv with `openood`), `source` = the file. Files without the
    checkpoint or interval columns (one run of the model's own checkpoint, no intervals) are read too."""
    columns, metrics = (OPENOOD_COLUMNS, OPENOOD_METRICS) if openood else (CSV_COLUMNS, RESULTS_METRICS)
    check_against_manifest(path)
    with _open_text(path) as handle:
        reader = csv.DictReader(handle)
        missing = [name for name in columns if name not in (reader.fieldnames or [])
                   and name != "checkpoint" and "_ci_" not in name]
        if missing:
            raise UserError(f"{path}: missing columns {missing}")
        rows = []
        for line_number, record in enumerate(reader, start=2):
            where = f"{path}, line {line_number}"
            values = _floats(record, [*metrics, "id_acc"], where)
            if len(values) < len(metrics) + 1:
                raise UserError(f"{where}: a metric is missing")
            rows.append(ResultRow(**{name: record[name] for name in IDENTITY_COLUMNS}, id_acc=values.pop("id_acc"),
                                  metrics=values, checkpoint=record.get("checkpoint") or "",
                                  intervals=_intervals(record, metrics, where), source=str(path)))
    return rows


def _open_text(path: Path) -> io.StringIO:
    """A result file's text, as CSV reads it; a file that is not UTF-8 text is a UserError naming it."""
    try:
        return io.StringIO(path.read_text(encoding="utf-8"), newline="")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a UTF-8 text file: not a result file of this repository") from None


def read_averages(path: Path, source: str) -> list[AverageRow]:
    """The rows of an averages.csv, with `source` = the results file they belong to."""
    check_against_manifest(path)
    with _open_text(path) as handle:
        records = list(csv.DictReader(handle))
    averages = []
    for line_number, record in enumerate(records, start=2):
        where = f"{path}, line {line_number}"
        try:
            identity = {name: record[name] for name in ("model", "train_data", "id_data", "detector")}
            label, sets = record["average"], tuple(record["ood_sets"].split(OOD_SETS_SEPARATOR))
        except KeyError as error:
            raise UserError(f"{where}: missing column {error}") from None
        averages.append(AverageRow(**identity, label=label, ood_sets=sets,
                                   metrics=_floats(record, METRIC_NAMES, where),
                                   checkpoint=record.get("checkpoint") or "",
                                   intervals=_intervals(record, METRIC_NAMES, where), source=source))
    return averages


def _intervals(record: dict[str, str], metrics: Sequence[str], where: str) -> dict[str, tuple[float, float]]:
    bounds = _floats(record, _interval_columns(metrics), where)
    return {metric: (bounds[f"{metric}_ci_low"], bounds[f"{metric}_ci_high"]) for metric in metrics
            if f"{metric}_ci_low" in bounds and f"{metric}_ci_high" in bounds}
