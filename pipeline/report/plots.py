"""Figures per OOD set: ID vs OOD score histograms (one panel per detector) and ROC curves (ID positive).

The ROC's FPR axis is logarithmic down to 1/(number of OOD samples), the finest FPR the data can show, with a
linear stretch from there to 0 so curves starting at FPR 0 stay visible (matplotlib's "symlog"): at AUROCs above
98% the low-FPR region is all that tells detectors apart. Figures are built with `matplotlib.figure.Figure` (no
pyplot, no global state) and written atomically, on their own (`write_score_plots`) or with a run's tables as
one set (`score_plot_writers` into `write_result`).
"""
from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import roc_curve

from ood_evaluation.metrics import ood_metrics
from pipeline.files import write_atomically
from pipeline.result import RunScores

PANELS_PER_ROW = 3
DPI = 100
MIN_BINS, MAX_BINS = 5, 100
# the narrower set spans at least this many bins (up to MAX_NARROW_BINS in all), so a tight ID distribution
# beside a wide OOD one is drawn as a shape, not as one bar
MIN_BINS_PER_SET, MAX_NARROW_BINS = 8, 400
# ROC curves: ten colours (tab10, its grey made black, as the reference lines are grey); the first curve solid,
# the others cycling through three broken styles, so a curve drawn over one it coincides with leaves that one
# showing through its gaps, and no (colour, line style) pair repeats before 31 curves.
CURVE_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#000000",
                 "#bcbd22", "#17becf")
CURVE_BROKEN_STYLES = ("--", "-.", ":")
CURVE_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
_UNSAFE_FILE_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]")


def safe_file_name(name: str) -> str:
    """`name` with every character other than letters, digits, '-', '_' and '.' replaced by '_'."""
    return _UNSAFE_FILE_CHARACTERS.sub("_", name)


def _format_title(detector: str, metrics: dict[str, float]) -> str:
    return f"{detector}  AUROC {100 * metrics['auroc']:.2f}  FPR95 {100 * metrics['fpr95']:.2f}"


def panel_title(detector: str, id_scores: np.ndarray, ood_scores: np.ndarray) -> str:
    """Panel title: the detector name with its AUROC and FPR95 in percent, e.g. 'knn  AUROC 93.10  FPR95 30.52'."""
    return _format_title(detector, ood_metrics(id_scores, ood_scores))


def _shared_bin_edges(id_scores: np.ndarray, ood_scores: np.ndarray) -> np.ndarray:
    """Equal bins over both sets, spanning each set's 0.1%..99.9% quantiles so a few outliers cannot squash the
    plot. Their number is numpy's "auto" estimate on both sets' scores within that span (MIN_BINS..MAX_BINS), or
    more where the bulk of one set (its 5%..95% quantiles) is much narrower than the span: then that bulk covers
    MIN_BINS_PER_SET bins (at most MAX_NARROW_BINS in all)."""
    spans = [np.quantile(scores, [0.001, 0.999]) for scores in (id_scores, ood_scores)]
    low, high = min(span[0] for span in spans), max(span[1] for span in spans)
    if not high > low:                                   # constant scores
        low, high = low - 0.5, high + 0.5
    estimated = np.histogram_bin_edges(np.concatenate([id_scores, ood_scores]), bins="auto", range=(low, high))
    num_bins = int(np.clip(estimated.size - 1, MIN_BINS, MAX_BINS))
    bulks = [np.quantile(scores, [0.05, 0.95]) for scores in (id_scores, ood_scores)]
    widths = [bulk[1] - bulk[0] for bulk in bulks if bulk[1] > bulk[0]]
    if widths:
        num_bins = max(num_bins, min(MAX_NARROW_BINS, math.ceil(MIN_BINS_PER_SET * (high - low) / min(widths))))
    return np.linspace(low, high, num_bins + 1)


def _density(scores: np.ndarray, edges: np.ndarray) -> np.ndarray:
    # Normalised by all points, not only those inside the edges, so clipped tails lower the bars honestly.
    counts, _ = np.histogram(scores, bins=edges)
    return counts / (scores.size * np.diff(edges))


def _histogram_figure(id_name: str, ood_name: str, id_scores: dict[str, np.ndarray],
                      ood_scores: dict[str, np.ndarray], titles: dict[str, str]) -> Figure:
    num_columns = min(PANELS_PER_ROW, len(id_scores))
    num_rows = math.ceil(len(id_scores) / num_columns)
    width, height = 4.2 * num_columns, 2.9 * num_rows + 1.1
    figure = Figure(figsize=(width, height), dpi=DPI)
    # fixed margins in inches: constrained layout measures every tick label and is several times slower
    figure.subplots_adjust(left=0.75 / width, right=1 - 0.2 / width, bottom=0.75 / height, top=1 - 0.95 / height,
                           wspace=0.35, hspace=0.75)
    axes = figure.subplots(num_rows, num_columns, squeeze=False).ravel()
    for ax, detector in zip(axes, id_scores):
        id_values = np.asarray(id_scores[detector], dtype=np.float64).ravel()
        ood_values = np.asarray(ood_scores[detector], dtype=np.float64).ravel()
        edges = _shared_bin_edges(id_values, ood_values)
        ax.stairs(_density(id_values, edges), edges, fill=True, alpha=0.5, color="C0", label=f"ID ({id_name})")
        ax.stairs(_density(ood_values, edges), edges, fill=True, alpha=0.5, color="C3", label=ood_name)
        ax.set_title(titles[detector], fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.yaxis.set_major_locator(MaxNLocator(4))
        ax.ticklabel_format(useOffset=False)             # tick labels are the scores, not offsets from one
        ax.tick_params(labelsize=7)
        ax.set_xlabel("score (higher = in-distribution)", fontsize=8)
        ax.set_ylabel("density", fontsize=8)
    for ax in axes[len(id_scores):]:
        ax.set_visible(False)
    figure.suptitle(f"Score densities: ID {id_name} vs OOD {ood_name} (higher score = more in-distribution)",
                    y=1 - 0.12 / height, fontsize=11)
    figure.legend(*axes[0].get_legend_handles_labels(), loc="upper center", ncols=2, fontsize=9,
                  bbox_to_anchor=(0.5, 1 - 0.36 / height), frameon=False)
    return figure


def _curve_style(index: int) -> dict[str, str]:
    """Colour, line style and marker of the index-th ROC curve."""
    return {"color": CURVE_COLOURS[index % len(CURVE_COLOURS)],
            "linestyle": "-" if index == 0 else CURVE_BROKEN_STYLES[(index - 1) % len(CURVE_BROKEN_STYLES)],
            "marker": CURVE_MARKERS[index % len(CURVE_MARKERS)]}


def _split_diagonal_steps(fpr: np.ndarray, tpr: np.ndarray, to_axis: Callable[[np.ndarray], np.ndarray],
                          from_axis: Callable[[np.ndarray], np.ndarray], points: int = 16
                          ) -> tuple[np.ndarray, np.ndarray]:
    """ROC points with each diagonal step (ID and OOD scores tied, interpolated linearly in ROC space) split into
    `points` points evenly spaced along the axis, so that on a log axis it is not drawn as a straight line."""
    diagonal = (np.diff(fpr) > 0) & (np.diff(tpr) > 0)
    counts = np.where(diagonal, points, 1)
    step = np.repeat(np.arange(fpr.size - 1), counts)                  # the step each new point lies on
    fraction = (np.arange(step.size) - np.repeat(np.cumsum(counts) - counts, counts) + 1) / counts[step]
    start, stop = to_axis(fpr[step]), to_axis(fpr[step + 1])
    x = np.where(diagonal[step], from_axis(start + fraction * (stop - start)), fpr[step + 1])
    slope = (tpr[step + 1] - tpr[step]) / np.where(diagonal[step], fpr[step + 1] - fpr[step], 1.0)
    y = np.where(diagonal[step], tpr[step] + (x - fpr[step]) * slope, tpr[step + 1])
    return np.concatenate([fpr[:1], x]), np.concatenate([tpr[:1], y])


def _tpr_at_fpr95(fpr: np.ndarray, tpr: np.ndarray, fpr95: float, detector: str) -> float:
    """TPR of the ROC point `ood_metrics` took its fpr95 from: among the points at that FPR, the TPR nearest 0.95.

    `fpr`, `tpr` are the full curve (`drop_intermediate=False`, as `ood_metrics` computes it)."""
    at_fpr95 = tpr[fpr == fpr95]
    if at_fpr95.size == 0:
        raise ValueError(f"{detector}: fpr95 {fpr95} is no point of its ROC curve; metrics of other scores?")
    return float(at_fpr95[np.argmin(np.abs(at_fpr95 - 0.95))])


def _roc_figure(id_name: str, ood_name: str, id_scores: dict[str, np.ndarray],
                ood_scores: dict[str, np.ndarray], metrics: dict[str, dict[str, float]]) -> Figure:
    """ROC curves of every detector on a log FPR axis, each with its FPR95 point marked; `metrics[detector]` are
    the `ood_metrics` dicts, whose auroc and fpr95 the legend shows and whose fpr95 the markers sit at."""
    id_values = {detector: np.asarray(scores, dtype=np.float64).ravel() for detector, scores in id_scores.items()}
    ood_values = {detector: np.asarray(ood_scores[detector], dtype=np.float64).ravel() for detector in id_scores}
    num_ood = max(values.size for values in ood_values.values())
    legend_rows = math.ceil((len(id_scores) + 2) / 2)  # the detectors, the chance line and the TPR 0.95 line
    height = 5.3 + 0.19 * legend_rows
    figure = Figure(figsize=(6.4, height), dpi=DPI)
    figure.subplots_adjust(left=0.11, right=0.97, bottom=(1.0 + 0.19 * legend_rows) / height, top=1 - 0.45 / height)
    ax = figure.subplots()
    # Below 1/num_ood, the smallest non-zero FPR there is, the axis is linear down to 0, a quarter of a decade
    # wide: room for the FPR-0 markers, no more.
    ax.set_xscale("symlog", linthresh=1.0 / num_ood, linscale=0.25)
    to_axis = ax.xaxis.get_transform().transform_non_affine
    from_axis = ax.xaxis.get_transform().inverted().transform_non_affine
    # Each curve (and FPR95 marker) smaller than the one before, so one drawn over an identical one leaves it
    # showing at its sides.
    line_widths = np.linspace(2.8, 1.2, len(id_scores)) if len(id_scores) > 1 else [1.5]
    for index, detector in enumerate(id_scores):
        is_id = np.concatenate([np.ones(id_values[detector].size, dtype=int),
                                np.zeros(ood_values[detector].size, dtype=int)])
        scores = np.concatenate([id_values[detector], ood_values[detector]])
        style = _curve_style(index)
        fpr, tpr, _ = roc_curve(is_id, scores)
        ax.plot(*_split_diagonal_steps(fpr, tpr, to_axis, from_axis), color=style["color"],
                linestyle=style["linestyle"], linewidth=line_widths[index], gid=f"{detector} roc",
                label=_format_title(detector, metrics[detector]), marker=style["marker"], markevery=[])
        full_fpr, full_tpr, _ = roc_curve(is_id, scores, drop_intermediate=False)
        fpr95 = metrics[detector]["fpr95"]
        ax.plot([fpr95], [_tpr_at_fpr95(full_fpr, full_tpr, fpr95, detector)], linestyle="none",
                marker=style["marker"], markersize=2 + 2.5 * line_widths[index], color=style["color"],
                markeredgecolor="white", markeredgewidth=0.8, zorder=3, gid=f"{detector} fpr95",
                clip_on=False)  # a marker at FPR 0 sits on the axis: drawn whole, not cut in half
    chance = np.concatenate([[0.0], np.geomspace(1.0 / num_ood, 1.0, 200)])
    ax.plot(chance, chance, linestyle="--", color="0.6", linewidth=0.8, label="chance", gid="chance")
    ax.axhline(0.95, linestyle=":", color="0.4", linewidth=0.8, label="TPR 0.95", gid="tpr 0.95")
    ax.set_xticks([0.0, *10.0 ** np.arange(-math.floor(math.log10(num_ood) + 1e-9), 1)])   # decades >= 1/num_ood
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel=f"FPR (OOD accepted as ID), log scale; linear below 1/{num_ood}",
           ylabel="TPR (ID accepted)", title=f"ROC: ID {id_name} vs OOD {ood_name}")
    ax.grid(True, which="major", linewidth=0.4, color="0.85")
    figure.legend(*ax.get_legend_handles_labels(), loc="lower center", ncols=2, fontsize=8, frameon=False,
                  title="AUROC and FPR95 (%); marker: the FPR95 point (TPR nearest 0.95)", title_fontsize=8,
                  bbox_to_anchor=(0.5, 0.005))
    return figure


def _png_writer(figure: Callable[[], Figure]) -> Callable[[Path], None]:
    """write(path) that draws the figure only when called, so a run holds one figure at a time."""
    return lambda path: figure().savefig(path, format="png", dpi=DPI)


def score_plot_writers(scores: RunScores) -> dict[str, Callable[[Path], None]]:
    """{file name: write(path)} per OOD set of a run's scores: scores_<set>.png (ID vs OOD histograms, one panel per
    detector), then roc_<set>.png; for `write_score_plots`, or `write_result`, which replaces them together with
    the tables. Inputs are checked here, the figures drawn by each write."""
    id_name, id_scores = scores.id_set, scores.scores[scores.id_set]
    ood_scores = {name: scores.scores[name] for name in scores.ood_sets}
    if not id_scores:
        raise ValueError("id_scores has no detectors")
    file_names: dict[str, str] = {}
    for ood_name, by_detector in ood_scores.items():
        if set(by_detector) != set(id_scores):
            raise ValueError(f"OOD set {ood_name!r} has detectors {list(by_detector)}, ID has {list(id_scores)}")
        file_name = safe_file_name(ood_name)
        if file_name in file_names:
            raise ValueError(f"OOD sets {file_names[file_name]!r} and {ood_name!r} share the file name {file_name!r}")
        file_names[file_name] = ood_name

    writers: dict[str, Callable[[Path], None]] = {}
    for file_name, ood_name in file_names.items():
        set_metrics = {detector: ood_metrics(id_scores[detector], ood_scores[ood_name][detector])
                       for detector in id_scores}
        titles = {detector: _format_title(detector, set_metrics[detector]) for detector in id_scores}
        writers[f"scores_{file_name}.png"] = _png_writer(functools.partial(
            _histogram_figure, id_name, ood_name, id_scores, ood_scores[ood_name], titles))
        writers[f"roc_{file_name}.png"] = _png_writer(functools.partial(
            _roc_figure, id_name, ood_name, id_scores, ood_scores[ood_name], set_metrics))
    return writers


def write_score_plots(output_dir: Path, scores: RunScores) -> list[Path]:
    """Write `score_plot_writers`' PNGs into `output_dir`, each atomically; returns their paths (scores, roc per
    set). A run's results folder uses `write_result` instead, which replaces them as a set."""
    written = []
    for file_name, write in score_plot_writers(scores).items():
        write_atomically(Path(output_dir) / file_name, write)
        written.append(Path(output_dir) / file_name)
    return written
