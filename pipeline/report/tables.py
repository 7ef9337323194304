"""Paper-style tables of result rows: FPR95 and AUROC per OOD set, then the averages, for the terminal and markdown."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ood_evaluation.definitions import BY_NAME
from pipeline.run.averages import paper_averages
from pipeline.result import AverageRow, Interval, ResultRow

MISSING = "-"
TABLE_METRICS = ("fpr95", "auroc")  # the paper's columns per OOD set, in order
Cell = float | None  # a metric in percent; None where a result is missing
# A table before formatting: its header, and per line the label cells and the numbers
NumericTable = tuple[list[str], list[tuple[list[str], list[Cell]]]]
# (detector, the OOD sets of a cell: one, or those averaged) -> {metric: (low, high)} in percent
Intervals = dict[tuple[str, frozenset[str]], dict[str, Interval]]


def mean_cells(results: Sequence[ResultRow | None], metrics: Sequence[str]) -> list[Cell]:
    """Each metric averaged over `results`; None when any result is missing."""
    if not all(results):
        return [None] * len(metrics)
    return [sum(row.metrics[metric] for row in results) / len(results) for metric in metrics]


def paper_table_numbers(rows: Sequence[ResultRow], ood_sets: list[str] | None = None,
                        detectors: list[str] | None = None) -> NumericTable:
    """One line per detector: FPR95 and AUROC per OOD set, then the averages; sets and detectors in first-seen
    order unless given (replicates of a run share the union's columns).

    Avg-4 is the paper's Average (iNaturalist, SUN, Places, Textures), shown when all four are present;
    Avg-all averages every OOD set. A missing result, and any average needing it, is None."""
    ood_sets = ood_sets or list(dict.fromkeys(row.ood_data for row in rows))
    detectors = detectors or list(dict.fromkeys(row.detector for row in rows))
    cells = {(row.detector, row.ood_data): row for row in rows}
    columns = paper_columns(ood_sets)
    header = ["Detector"] + [f"{label} {BY_NAME[metric].title}" for label in columns for metric in TABLE_METRICS]
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


def paper_table(rows: Sequence[ResultRow], averages: Sequence[AverageRow] = ()) -> list[list[str]]:
    """Header + one line per detector: `paper_table_numbers` of one run, two decimals, "-" where missing; a
    cell with a bootstrap interval (a row's, or for an average the `averages` row of its sets) shows it as
    "value [low, high]"."""
    table = format_table([paper_table_numbers(rows)])
    add_paper_intervals(table, list(dict.fromkeys(row.ood_data for row in rows)), interval_index(rows, averages))
    return table


def add_paper_intervals(table: list[list[str]], ood_sets: list[str], intervals: Intervals) -> None:
    """Append " [low, high]" to each cell of a one-run paper table (columns `paper_columns(ood_sets)`) whose
    (detector, sets) has an interval."""
    for line in table[1:]:
        for group, sets in enumerate(paper_columns(ood_sets).values()):
            found = intervals.get((line[0], frozenset(sets)), {})
            for offset, metric in enumerate(TABLE_METRICS):
                column = 1 + len(TABLE_METRICS) * group + offset
                line[column] = with_interval(line[column], found.get(metric))


def with_interval(cell: str, interval: Interval | None) -> str:
    """A formatted cell with its interval appended, " [low, high]" (percentile intervals are not symmetric);
    unchanged without one or where missing."""
    return cell if interval is None or cell == MISSING else f"{cell} [{interval[0]:.2f}, {interval[1]:.2f}]"


def has_interval(cell: str) -> bool:
    """Whether a formatted cell shows an interval."""
    return cell.endswith("]")


def intervals_legend(level: str = "95%") -> str:
    """The line under a table whose cells show bootstrap intervals: what the brackets are, and are not."""
    return (f"[low, high]: the {level} percentile bootstrap interval over the test images; it does not cover other "
            f"draws of the bank, other checkpoints or other OOD sets.")


def interval_index(rows: Sequence[ResultRow], averages: Sequence[AverageRow] = ()) -> Intervals:
    """Each row's intervals under (detector, {its OOD set}), and each average's under (detector, its sets) where
    the rows of those sets all come from its run (the same `source`)."""
    index = {(row.detector, frozenset([row.ood_data])): dict(row.intervals) for row in rows}
    sources = {(row.detector, row.ood_data): row.source for row in rows}
    for average in averages:
        if all(sources.get((average.detector, name), None) == average.source for name in average.ood_sets):
            index[(average.detector, frozenset(average.ood_sets))] = dict(average.intervals)
    return index


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
