"""The paper's tables from many runs: every results.csv below a folder, one table per (model, ID set).

    python -m pipeline.tools.aggregate logs/paper [--output-dir DIR] [--ci]
    python -m pipeline.tools.aggregate logs/openood --openood     # OpenOOD v1.5's shape, from results_openood.csv

Rows are detectors, columns FPR95 and AUROC per OOD set, then two averages: Avg-4, the paper's
"Average" (iNaturalist, SUN, Places, Textures; OpenImage-O has its own column), and Avg-all over every
OOD column of the table. A detector missing an OOD set shows "-" there and in the averages that need it.

With --openood, one table per (model, ID set) that has results on one of OpenOOD v1.5's benchmarks (ImageNet-1K,
CIFAR-10, CIFAR-100), shaped like OpenOOD's evaluator output: per detector, one row per OOD set and the near-OOD
and far-OOD averages, columns FPR95 (OpenOOD's convention, OOD positive), AUROC, AUPR-in, AUPR-out and ID accuracy.

Runs of one model with different checkpoints (--checkpoint, e.g. OpenOOD's three training runs) are replicates:
their tables show each cell's mean ± population std over the checkpoints, averages taken per checkpoint first,
as OpenOOD's scripts/eval_ood.py reports them.

With --ci, the tables of one checkpoint show each cell as value [low, high], its bootstrap interval: a per-set
cell from its results.csv's interval columns, an average from the averages.csv beside it when that run averaged
exactly the column's sets (else the bare value; the legend lists such cells). Tables of several checkpoints keep
mean ± std: the spread over checkpoints is the larger uncertainty there, and one run's interval is not theirs.
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

from errors import UserError
from pipeline.files import write_atomically
from pipeline.report.rows import AVERAGES_FILE, OPENOOD_FILE, RESULTS_FILE, SWEEP_FILE, read_averages, read_rows
from pipeline.report.tables import (MISSING, NumericTable, add_paper_intervals, format_markdown, format_table,
                                    format_terminal, has_interval, interval_index, intervals_legend, mean_cells,
                                    paper_table_legend, paper_table_numbers, with_interval)
from pipeline.result import AverageRow, ResultRow
from pipeline.run.averages import OPENOOD_BENCHMARKS, OpenOODBenchmark

OPENOOD_TABLE_METRICS = ("fpr95_ood_positive", "auroc", "aupr_in", "aupr_out")  # OpenOOD's column order


def openood_legend(benchmark: OpenOODBenchmark) -> str:
    return (f"In percent. FPR95 is OpenOOD's (OOD positive: the ID images rejected at the first threshold detecting "
            f"95% of the OOD images); results.csv keeps the paper's. Near-OOD averages {', '.join(benchmark.near)}; "
            f"Far-OOD averages {', '.join(benchmark.far)}.")


TableKey = tuple[str, str]  # (model, id_data)
_SWEEP_RUN_FOLDER = re.compile(r"([A-Za-z_][\w.]*)=.+")  # <key>=<value>, as pipeline.run.sweep names them


def is_sweep_run(results_file: Path) -> bool:
    """Whether a results file is one value's run of a sweep: in a `<key>=<value>` folder whose parent holds the
    sweep's sweep.csv or is named `sweep-<key>` (a sweep still running). A sweep's runs repeat one experiment,
    so they have a table of their own, sweep.md."""
    folder = results_file.parent
    key = _SWEEP_RUN_FOLDER.fullmatch(folder.name)
    return key is not None and ((folder.parent / SWEEP_FILE).is_file() or folder.parent.name == f"sweep-{key[1]}")


def sweeps_under(root: Path, openood: bool = False) -> list[Path]:
    """The sweep folders whose runs `collect` leaves out."""
    file_name = OPENOOD_FILE if openood else RESULTS_FILE
    return sorted({path.parent.parent for path in root.rglob(file_name) if is_sweep_run(path)})


def collect(root: Path, openood: bool = False) -> list[ResultRow]:
    """Rows of every results.csv (results_openood.csv with `openood`) below root but those of sweeps' runs,
    `source` = the file; duplicates (the same model, checkpoint, data and detector twice) are an error."""
    file_name = OPENOOD_FILE if openood else RESULTS_FILE
    found = sorted(root.rglob(file_name))
    paths = [path for path in found if not is_sweep_run(path)]
    if not paths:
        sweeps = " but those of sweeps, whose tables are their sweep.md" if found else ""
        raise UserError(f"no {file_name} found under {root}{sweeps}")
    rows: list[ResultRow] = []
    seen: dict[tuple[str, ...], Path] = {}
    for path in paths:
        for row in read_rows(path, openood):
            key = (row.model, row.checkpoint, row.id_data, row.ood_data, row.detector)
            if key in seen:
                checkpoint = f" checkpoint={key[1]}" if key[1] else ""
                raise UserError(f"duplicate result for model={key[0]}{checkpoint} id_data={key[2]} ood_data={key[3]} "
                                f"detector={key[4]}: in {seen[key]} and in {path}")
            seen[key] = path
            rows.append(row)
    return rows


def collect_averages(rows: list[ResultRow]) -> list[AverageRow]:
    """The rows of the averages.csv beside each results file of `rows` (none where a run wrote none), with
    `source` = that results file, as interval_index matches them."""
    averages = []
    for source in dict.fromkeys(row.source for row in rows):
        path = Path(source).parent / AVERAGES_FILE
        if path.exists():
            averages += read_averages(path, source)
    return averages


def _groups(rows: list[ResultRow]) -> dict[TableKey, list[ResultRow]]:
    """Rows by (model, id_data), in first-seen order."""
    groups: dict[TableKey, list[ResultRow]] = {}
    for row in rows:
        groups.setdefault((row.model, row.id_data), []).append(row)
    return groups


def _replicates(rows: list[ResultRow]) -> list[list[ResultRow]]:
    """A table's rows split by checkpoint, in first-seen order: one list per replicate run."""
    by_checkpoint: dict[str, list[ResultRow]] = {}
    for row in rows:
        by_checkpoint.setdefault(row.checkpoint, []).append(row)
    return list(by_checkpoint.values())


def _first_seen(rows: list[ResultRow], key: str) -> list[str]:
    return list(dict.fromkeys(getattr(row, key) for row in rows))


def paper_tables(rows: list[ResultRow],
                 averages: list[AverageRow] | None = None) -> dict[TableKey, list[list[str]]]:
    """{(model, id_data): table}, in first-seen order; replicates give mean ± std cells. With `averages`
    (collect_averages', for --ci), a table of one checkpoint shows the intervals it has (add_paper_intervals)."""
    tables = {}
    for key, group in _groups(rows).items():
        ood_sets, replicates = _first_seen(group, "ood_data"), _replicates(group)
        tables[key] = format_table([paper_table_numbers(replicate, ood_sets, _first_seen(group, "detector"))
                                    for replicate in replicates])
        if averages is not None and len(replicates) == 1:
            add_paper_intervals(tables[key], ood_sets, interval_index(group, averages))
    return tables


def openood_benchmark(rows: list[ResultRow]) -> OpenOODBenchmark | None:
    """The OpenOOD v1.5 benchmark whose OOD sets the rows hold results on; None if none."""
    ood_sets = {row.ood_data for row in rows}
    return next((benchmark for benchmark in OPENOOD_BENCHMARKS if ood_sets & {*benchmark.near, *benchmark.far}),
                None)


def _openood_sections(benchmark: OpenOODBenchmark, ood_sets: list[str]) -> dict[str, tuple[str, ...]]:
    """An OpenOOD table's lines per detector, {label: the OOD sets averaged}: each near-OOD set, their average,
    each far-OOD set, their average, then any other OOD set."""
    others = [name for name in ood_sets if name not in benchmark.near + benchmark.far]
    return {**{name: (name,) for name in benchmark.near}, "Near-OOD": benchmark.near,
            **{name: (name,) for name in benchmark.far}, "Far-OOD": benchmark.far, **{name: (name,) for name in others}}


def _openood_numbers(rows: list[ResultRow], sections: dict[str, tuple[str, ...]],
                     detectors: list[str]) -> NumericTable:
    """One replicate's OpenOOD-shaped lines: per detector, one per section; numbers FPR95 (OOD positive), AUROC,
    AUPR-in, AUPR-out, ID acc."""
    cells = {(row.detector, row.ood_data): row for row in rows}
    lines = []
    for detector in detectors:
        id_acc = next((row.id_acc for row in rows if row.detector == detector), None)
        for label, names in sections.items():
            numbers = mean_cells([cells.get((detector, name)) for name in names], OPENOOD_TABLE_METRICS)
            lines.append(([detector, label], [*numbers, id_acc]))
    return ["Detector", "OOD set", "FPR95", "AUROC", "AUPR-in", "AUPR-out", "ID Acc"], lines


def openood_table(rows: list[ResultRow], averages: list[AverageRow] | None = None) -> list[list[str]]:
    """OpenOOD's evaluator shape for one (model, id_data), two decimals, mean ± std over checkpoints; a missing
    result, and an average needing it, shows "-". With `averages` (for --ci), a table of one checkpoint shows the
    intervals it has, as paper_tables does (ID accuracy has none)."""
    benchmark = openood_benchmark(rows)
    if benchmark is None:
        raise ValueError("the rows hold no result on an OpenOOD v1.5 set")
    sections, replicates = _openood_sections(benchmark, _first_seen(rows, "ood_data")), _replicates(rows)
    table = format_table([_openood_numbers(replicate, sections, _first_seen(rows, "detector"))
                          for replicate in replicates])
    if averages is not None and len(replicates) == 1:
        intervals = interval_index(rows, averages)
        for line in table[1:]:
            found = intervals.get((line[0], frozenset(sections[line[1]])), {})
            for offset, metric in enumerate(OPENOOD_TABLE_METRICS):
                line[2 + offset] = with_interval(line[2 + offset], found.get(metric))
    return table


def openood_tables(rows: list[ResultRow],
                   averages: list[AverageRow] | None = None) -> dict[TableKey, list[list[str]]]:
    """{(model, id_data): OpenOOD-shaped table} for the groups with a result on any OpenOOD v1.5 set."""
    tables = {key: openood_table(group, averages) for key, group in _groups(rows).items() if openood_benchmark(group)}
    if not tables:
        sources = ", ".join(sorted({row.source for row in rows}))
        every_set = [name for benchmark in OPENOOD_BENCHMARKS for name in (*benchmark.near, *benchmark.far)]
        raise UserError(f"no results on OpenOOD v1.5's sets ({', '.join(every_set)}) in {sources}")
    return tables


def _title(group: list[ResultRow], key: TableKey) -> str:
    banks = ", ".join(_first_seen(group, "train_data"))
    checkpoints = len(_replicates(group))
    replicates = f" (mean ± std over {checkpoints} checkpoints)" if checkpoints > 1 else ""
    return f"{key[0]}: ID {key[1]}, bank from {banks}{replicates}"


def spread_legend(checkpoints: int) -> str:
    """The line under a table of several checkpoints: what its ± is."""
    return (f"± is the population standard deviation over the {checkpoints} checkpoints (each run's own bootstrap "
            f"intervals are in its results.csv and averages.csv).")


def interval_legend(table: list[list[str]], openood: bool) -> str:
    """What --ci shows in a table of one checkpoint, and which of its values have no interval."""
    legend = intervals_legend("run's ci_level (95% by default)")
    if openood:  # metric columns 2 to 5; lines named by their OOD set or average
        lacking = list(dict.fromkeys(line[1] for line in table[1:] if any(
            _lacks_interval(cell) for cell in line[2:2 + len(OPENOOD_TABLE_METRICS)])))
    else:
        lacking = [header for column, header in enumerate(table[0]) if column > 0 and any(
            _lacks_interval(line[column]) for line in table[1:])]
    if lacking:
        legend += (f" No interval for {', '.join(lacking)}: their run stored none (written before intervals, or "
                   f"with bootstrap=0), or no single run averaged exactly those sets.")
    return legend + (" ID Acc has no interval." if openood else "")


def _lacks_interval(cell: str) -> bool:
    return cell != MISSING and not has_interval(cell)


def write_tables(rows: list[ResultRow], output_dir: Path, openood: bool = False,
                 averages: list[AverageRow] | None = None) -> str:
    """Writes <model>__<id_data>.md/.csv per table and tables.md (with `openood`: <model>__<id_data>__openood
    .md/.csv and tables_openood.md); returns all tables for the terminal. With `averages` (collect_averages', for
    --ci) the tables show intervals and each legend says where they are missing."""
    tables, suffix = ((openood_tables(rows, averages), "__openood") if openood
                      else (paper_tables(rows, averages), ""))
    sections, terminal, legends = [], [], []
    groups = _groups(rows)
    for key, table in tables.items():
        benchmark = openood_benchmark(groups[key]) if openood else None
        title = _title(groups[key], key) + (f" (OpenOOD v1.5 {benchmark.name})" if benchmark else "")
        legend = openood_legend(benchmark) if benchmark else paper_table_legend(table)
        legends.append(legend)
        checkpoints = len(_replicates(groups[key]))
        note = (spread_legend(checkpoints) if checkpoints > 1 else
                interval_legend(table, openood) if averages is not None else "")
        markdown = f"# {title}\n\n{legend}\n\n{format_markdown(table)}" + (f"\n{note}\n" if note else "")
        stem = f"{key[0]}__{key[1]}{suffix}"
        write_atomically(output_dir / f"{stem}.md", lambda path, text=markdown: path.write_text(text))
        write_atomically(output_dir / f"{stem}.csv", lambda path, table=table: _write_csv(path, table))
        sections.append(markdown)
        terminal.append(f"{title}\n{format_terminal(table)}" + (f"\n{note}" if note else ""))
    combined = "\n".join(sections)
    write_atomically(output_dir / tables_file(openood), lambda path: path.write_text(combined))
    if not openood:  # one footer: Avg-4 explained if any table has it
        legends = [paper_table_legend([[cell for table in tables.values() for cell in table[0]]])]
    return "\n\n".join(terminal) + "\n\n" + "\n".join(dict.fromkeys(legends))


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
                        help=f"OpenOOD v1.5 tables (ImageNet-1K, CIFAR-10, CIFAR-100) from every {OPENOOD_FILE} "
                             f"below ROOT")
    parser.add_argument("--ci", action="store_true",
                        help=f"show each cell's bootstrap interval (value [low, high]) from the runs' result "
                             f"files and {AVERAGES_FILE}; tables of one checkpoint only")
    args = parser.parse_args(argv)
    try:
        rows = collect(args.root, args.openood)
        sweeps = sweeps_under(args.root, args.openood)
        if sweeps:
            print(f"left out the runs of {len(sweeps)} sweep(s), whose tables are their sweep.md: "
                  f"{', '.join(map(str, sweeps))}\n")
        output_dir = args.output_dir or args.root
        print(write_tables(rows, output_dir, args.openood, collect_averages(rows) if args.ci else None))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"\ntables: {output_dir / tables_file(args.openood)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
