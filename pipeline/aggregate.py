"""The paper's tables from many runs: every results.csv below a folder, one table per (model, ID set).

    python -m pipeline.aggregate logs/paper [--output-dir DIR]
    python -m pipeline.aggregate logs/openood --openood     # OpenOOD v1.5's shape, from results_openood.csv

Rows are detectors, columns FPR95 and AUROC per OOD set, then two averages: Avg-4, the paper's
"Average" (iNaturalist, SUN, Places, Textures; OpenImage-O has its own column), and Avg-all over every
OOD column of the table. A detector missing an OOD set shows "-" there and in the averages that need it.

With --openood, one table per (model, ID set) that has results on OpenOOD v1.5's ImageNet-1K sets, shaped
like OpenOOD's evaluator output: per detector, one row per OOD set and the near-OOD and far-OOD averages,
columns FPR95 (OpenOOD's convention, OOD positive), AUROC, AUPR-in, AUPR-out and ID accuracy.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any

from errors import UserError
from pipeline.cache import write_atomically
from pipeline.report import (CSV_COLUMNS, MISSING, OPENOOD_COLUMNS, OPENOOD_FILE, format_markdown, format_terminal,
                             paper_table, paper_table_legend)

METRIC_COLUMNS = ("auroc", "fpr95", "aupr_in", "aupr_out", "dtacc", "id_acc")

OPENOOD_METRICS = ("fpr95_ood_positive", "auroc", "aupr_in", "aupr_out")  # OpenOOD's column order
OPENOOD_NEAR = ("openood-ssb-hard", "openood-ninco")
OPENOOD_FAR = ("openood-inaturalist", "openood-textures", "openood-openimage-o")
OPENOOD_LEGEND = ("In percent. FPR95 is OpenOOD's (OOD positive: the ID images rejected at the first threshold "
                  "detecting 95% of the OOD images); results.csv keeps the paper's. Near-OOD averages SSB-hard and "
                  "NINCO; Far-OOD averages iNaturalist, Textures and OpenImage-O.")

TableKey = tuple[str, str]  # (model, id_data)


def collect(root: Path, openood: bool = False) -> list[dict[str, Any]]:
    """Rows of every results.csv (results_openood.csv with `openood`) below root, metrics as floats and
    `source` = the file; duplicates are an error."""
    file_name, columns, metrics = ((OPENOOD_FILE, OPENOOD_COLUMNS, (*OPENOOD_METRICS, "id_acc")) if openood
                                   else ("results.csv", CSV_COLUMNS, METRIC_COLUMNS))
    paths = sorted(root.rglob(file_name))
    if not paths:
        raise UserError(f"no {file_name} found under {root}")
    rows: list[dict[str, Any]] = []
    seen: dict[tuple[str, str, str, str], Path] = {}
    for path in paths:
        for row in _read_results(path, columns, metrics):
            key = (row["model"], row["id_data"], row["ood_data"], row["detector"])
            if key in seen:
                raise UserError(f"duplicate result for model={key[0]} id_data={key[1]} ood_data={key[2]} "
                                f"detector={key[3]}: in {seen[key]} and in {path}")
            seen[key] = path
            rows.append(row)
    return rows


def _read_results(path: Path, columns: list[str], metric_columns: tuple[str, ...]) -> list[dict[str, Any]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [name for name in columns if name not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{path}: missing columns {missing}")
        rows = []
        for line_number, record in enumerate(reader, start=2):
            try:
                metrics = {name: float(record[name]) for name in metric_columns}
            except (TypeError, ValueError) as error:  # TypeError: a short line leaves None
                raise UserError(f"{path}, line {line_number}: a metric is missing or not a number ({error})") from error
            rows.append({**record, **metrics, "source": str(path)})
    return rows


def _groups(rows: list[dict[str, Any]]) -> dict[TableKey, list[dict[str, Any]]]:
    """Rows by (model, id_data), in first-seen order."""
    groups: dict[TableKey, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["id_data"]), []).append(row)
    return groups


def paper_tables(rows: list[dict[str, Any]]) -> dict[TableKey, list[list[str]]]:
    """{(model, id_data): table}, in first-seen order."""
    return {key: paper_table(group) for key, group in _groups(rows).items()}


def openood_table(rows: list[dict[str, Any]]) -> list[list[str]]:
    """OpenOOD's evaluator shape for one (model, id_data): header + per detector (first-seen order) one line
    per near-OOD set, their average, one per far-OOD set, their average, then any other OOD set.

    Cells are FPR95 (OOD positive), AUROC, AUPR-in, AUPR-out and ID accuracy, two decimals; a missing result,
    and an average needing it, shows "-"."""
    cells = {(row["detector"], row["ood_data"]): row for row in rows}
    others = [name for name in dict.fromkeys(row["ood_data"] for row in rows)
              if name not in OPENOOD_NEAR + OPENOOD_FAR]
    lines: list[tuple[str, tuple[str, ...]]] = [
        *[(name, (name,)) for name in OPENOOD_NEAR], ("Near-OOD", OPENOOD_NEAR),
        *[(name, (name,)) for name in OPENOOD_FAR], ("Far-OOD", OPENOOD_FAR), *[(name, (name,)) for name in others]]
    table = [["Detector", "OOD set", "FPR95", "AUROC", "AUPR-in", "AUPR-out", "ID Acc"]]
    for detector in dict.fromkeys(row["detector"] for row in rows):
        id_acc = next(row["id_acc"] for row in rows if row["detector"] == detector)
        for label, names in lines:
            results = [cells.get((detector, name)) for name in names]
            metrics = ([f"{sum(row[metric] for row in results) / len(results):.2f}" for metric in OPENOOD_METRICS]
                       if all(results) else [MISSING] * len(OPENOOD_METRICS))
            table.append([detector, label, *metrics, f"{id_acc:.2f}"])
    return table


def openood_tables(rows: list[dict[str, Any]]) -> dict[TableKey, list[list[str]]]:
    """{(model, id_data): OpenOOD-shaped table} for the groups with a result on any OpenOOD v1.5 set."""
    tables = {key: openood_table(group) for key, group in _groups(rows).items()
              if any(row["ood_data"] in OPENOOD_NEAR + OPENOOD_FAR for row in group)}
    if not tables:
        sources = ", ".join(sorted({row["source"] for row in rows}))
        raise UserError(f"no results on OpenOOD v1.5's sets ({', '.join(OPENOOD_NEAR + OPENOOD_FAR)}) in {sources}")
    return tables


def _title(rows: list[dict[str, Any]], key: TableKey) -> str:
    banks = ", ".join(dict.fromkeys(row["train_data"] for row in rows if (row["model"], row["id_data"]) == key))
    return f"{key[0]}: ID {key[1]}, bank from {banks}"


def write_tables(rows: list[dict[str, Any]], output_dir: Path, openood: bool = False) -> str:
    """Writes <model>__<id_data>.md/.csv per table and tables.md (with `openood`: <model>__<id_data>__openood
    .md/.csv and tables_openood.md); returns all tables for the terminal."""
    tables, suffix = (openood_tables(rows), "__openood") if openood else (paper_tables(rows), "")
    sections, terminal = [], []
    for key, table in tables.items():
        title = _title(rows, key) + (" (OpenOOD v1.5 ImageNet-1K)" if openood else "")
        legend = OPENOOD_LEGEND if openood else paper_table_legend(table)
        markdown = f"# {title}\n\n{legend}\n\n{format_markdown(table)}"
        stem = f"{key[0]}__{key[1]}{suffix}"
        write_atomically(output_dir / f"{stem}.md", lambda path, text=markdown: path.write_text(text))
        write_atomically(output_dir / f"{stem}.csv", lambda path, table=table: _write_csv(path, table))
        sections.append(markdown)
        terminal.append(f"{title}\n{format_terminal(table)}")
    combined = "\n".join(sections)
    write_atomically(output_dir / tables_file(openood), lambda path: path.write_text(combined))
    every_header = [[cell for table in tables.values() for cell in table[0]]]  # Avg-4 explained if any table has it
    footer = OPENOOD_LEGEND if openood else paper_table_legend(every_header)
    return "\n\n".join(terminal) + f"\n\n{footer}"


def tables_file(openood: bool) -> str:
    """The combined file's name: tables.md, or tables_openood.md for the OpenOOD tables."""
    return "tables_openood.md" if openood else "tables.md"


def _write_csv(path: Path, table: list[list[str]]) -> None:
    with path.open("w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The paper's tables from every results.csv below ROOT.")
    parser.add_argument("root", type=Path, help="folder searched for results.csv (e.g. logs/paper)")
    parser.add_argument("--output-dir", type=Path, help="where the tables go (default: ROOT)")
    parser.add_argument("--openood", action="store_true",
                        help=f"OpenOOD v1.5 ImageNet-1K tables from every {OPENOOD_FILE} below ROOT")
    args = parser.parse_args(argv)
    try:
        rows = collect(args.root, args.openood)
        output_dir = args.output_dir or args.root
        print(write_tables(rows, output_dir, args.openood))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"\ntables: {output_dir / tables_file(args.openood)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
