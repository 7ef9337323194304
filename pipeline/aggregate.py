"""The paper's tables from many runs: every results.csv below a folder, one table per (model, ID set).

    python -m pipeline.aggregate logs/paper [--output-dir DIR]

Rows are detectors, columns FPR95 and AUROC per OOD set, then two averages: Avg-4, the paper's
"Average" (iNaturalist, SUN, Places, Textures; OpenImage-O has its own column), and Avg-all over every
OOD column of the table. A detector missing an OOD set shows "-" there and in the averages that need it.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any

from errors import UserError
from pipeline.cache import write_atomically
from pipeline.report import CSV_COLUMNS, format_markdown, format_terminal, paper_table

METRIC_COLUMNS = ("auroc", "fpr95", "aupr_in", "aupr_out", "dtacc", "id_acc")
LEGEND = ("FPR95 (lower is better) and AUROC, in percent. Avg-4 (iNat, SUN, Places, Textures) is the paper's "
          "Average; Avg-all averages every OOD column.")

TableKey = tuple[str, str]  # (model, id_data)


def collect(root: Path) -> list[dict[str, Any]]:
    """Rows of every results.csv below root (metrics as floats, `source` = the file); duplicates are an error."""
    paths = sorted(root.rglob("results.csv"))
    if not paths:
        raise UserError(f"no results.csv found under {root}")
    rows: list[dict[str, Any]] = []
    seen: dict[tuple[str, str, str, str], Path] = {}
    for path in paths:
        for row in _read_results(path):
            key = (row["model"], row["id_data"], row["ood_data"], row["detector"])
            if key in seen:
                raise UserError(f"duplicate result for model={key[0]} id_data={key[1]} ood_data={key[2]} "
                                f"detector={key[3]}: in {seen[key]} and in {path}")
            seen[key] = path
            rows.append(row)
    return rows


def _read_results(path: Path) -> list[dict[str, Any]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [name for name in CSV_COLUMNS if name not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{path}: missing columns {missing}")
        rows = []
        for line_number, record in enumerate(reader, start=2):
            try:
                metrics = {name: float(record[name]) for name in METRIC_COLUMNS}
            except (TypeError, ValueError) as error:  # TypeError: a short line leaves None
                raise UserError(f"{path}, line {line_number}: a metric is missing or not a number ({error})") from error
            rows.append({**record, **metrics, "source": str(path)})
    return rows


def paper_tables(rows: list[dict[str, Any]]) -> dict[TableKey, list[list[str]]]:
    """{(model, id_data): table}, in first-seen order."""
    groups: dict[TableKey, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["id_data"]), []).append(row)
    return {key: paper_table(group) for key, group in groups.items()}


def _title(rows: list[dict[str, Any]], key: TableKey) -> str:
    banks = ", ".join(dict.fromkeys(row["train_data"] for row in rows if (row["model"], row["id_data"]) == key))
    return f"{key[0]}: ID {key[1]}, bank from {banks}"


def write_tables(rows: list[dict[str, Any]], output_dir: Path) -> str:
    """Writes <model>__<id_data>.md/.csv per table and tables.md; returns all tables for the terminal."""
    sections, terminal = [], []
    for key, table in paper_tables(rows).items():
        title = _title(rows, key)
        markdown = f"# {title}\n\n{LEGEND}\n\n{format_markdown(table)}"
        stem = output_dir / f"{key[0]}__{key[1]}"
        write_atomically(stem.with_suffix(".md"), lambda path, text=markdown: path.write_text(text))
        write_atomically(stem.with_suffix(".csv"), lambda path, table=table: _write_csv(path, table))
        sections.append(markdown)
        terminal.append(f"{title}\n{format_terminal(table)}")
    combined = "\n".join(sections)
    write_atomically(output_dir / "tables.md", lambda path: path.write_text(combined))
    return "\n\n".join(terminal) + f"\n\n{LEGEND}"


def _write_csv(path: Path, table: list[list[str]]) -> None:
    with path.open("w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The paper's tables from every results.csv below ROOT.")
    parser.add_argument("root", type=Path, help="folder searched for results.csv (e.g. logs/paper)")
    parser.add_argument("--output-dir", type=Path, help="where the tables go (default: ROOT)")
    args = parser.parse_args(argv)
    try:
        rows = collect(args.root)
        output_dir = args.output_dir or args.root
        print(write_tables(rows, output_dir))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"\ntables: {output_dir / 'tables.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
