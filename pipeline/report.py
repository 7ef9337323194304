"""Results as a paper-style table (terminal and markdown), results.csv, and the resolved config."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import yaml

from pipeline.cache import write_atomically

PAPER_AVERAGE_SETS = ("inaturalist", "sun", "places", "textures")  # the paper's "Average"; OpenImage-O apart
MISSING = "-"
CSV_COLUMNS = ["model", "train_data", "id_data", "ood_data", "detector", "auroc", "fpr95", "aupr_in",
               "aupr_out", "dtacc", "id_acc"]
# results_openood.csv, beside results.csv: the same runs with FPR95 in OpenOOD's convention (OOD positive)
OPENOOD_FILE = "results_openood.csv"
OPENOOD_COLUMNS = ["model", "train_data", "id_data", "ood_data", "detector", "auroc", "fpr95_ood_positive",
                   "aupr_in", "aupr_out", "id_acc"]


def _metric_cells(results: list[dict[str, Any] | None]) -> list[str]:
    """FPR95 and AUROC averaged over `results`, two decimals; "-" when any is missing."""
    if not all(results):
        return [MISSING, MISSING]
    return [f"{sum(row[metric] for row in results) / len(results):.2f}" for metric in ("fpr95", "auroc")]


def paper_table(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Header + one line per detector (first-seen order): FPR95 and AUROC per OOD set, then the averages.

    Avg-4 is the paper's Average (iNaturalist, SUN, Places, Textures), shown when all four are present;
    Avg-all averages every OOD set. A missing result, and any average needing it, shows "-"."""
    ood_sets = list(dict.fromkeys(row["ood_data"] for row in rows))
    detectors = list(dict.fromkeys(row["detector"] for row in rows))
    cells = {(row["detector"], row["ood_data"]): row for row in rows}
    averages = {"Avg-all": ood_sets}
    if all(name in ood_sets for name in PAPER_AVERAGE_SETS):
        averages = {"Avg-4": list(PAPER_AVERAGE_SETS), **averages}
    table = [["Detector"] + [f"{name} {metric}" for name in [*ood_sets, *averages]
                             for metric in ("FPR95", "AUROC")]]
    for detector in detectors:
        line = [detector]
        for names in [[name] for name in ood_sets] + list(averages.values()):
            line += _metric_cells([cells.get((detector, name)) for name in names])
        table.append(line)
    return table


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
                  provenance: dict[str, Any]) -> str:
    """Writes results.csv, results_openood.csv, results.md and config.yaml; returns the terminal table."""
    output_dir.mkdir(parents=True, exist_ok=True)
    table = paper_table(rows)
    first = rows[0]
    title = (f"# {first['model']}: ID {first['id_data']}, bank from {first['train_data']} "
             f"(ID accuracy {first['id_acc']:.2f}%)\n\nFPR95 (lower is better) and AUROC, in percent. "
             f"Avg-4 (iNaturalist, SUN, Places, Textures) is the paper's Average; Avg-all averages every "
             f"OOD column.\n\n")
    documents = {"results.csv": _csv_text(rows, CSV_COLUMNS), OPENOOD_FILE: _csv_text(rows, OPENOOD_COLUMNS),
                 "results.md": title + format_markdown(table),
                 "config.yaml": yaml.safe_dump({**resolved_config, "provenance": provenance}, sort_keys=False)}
    for name, text in documents.items():
        write_atomically(output_dir / name, lambda path, text=text: path.write_text(text))
    return format_terminal(table)
