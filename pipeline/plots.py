"""Figures per OOD set: ID vs OOD score histograms (one panel per detector) and ROC curves (ID positive).

Figures are built with `matplotlib.figure.Figure` (no pyplot, no global state) and written atomically, on their
own (`write_score_plots`) or with a run's tables as one set (`score_plot_writers` into `write_results`).
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

from ood_detectors.metrics import ood_metrics
from pipeline.cache import write_atomically

PANELS_PER_ROW = 3
DPI = 100
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
    """Bins over both sets, spanning each set's 0.1%..99.9% quantiles so a few outliers cannot squash the plot."""
    low = min(np.quantile(id_scores, 0.001), np.quantile(ood_scores, 0.001))
    high = max(np.quantile(id_scores, 0.999), np.quantile(ood_scores, 0.999))
    if not high > low:                                   # constant scores
        low, high = low - 0.5, high + 0.5
    num_bins = int(np.clip(np.sqrt(min(id_scores.size, ood_scores.size)), 5, 80))
    return np.linspace(low, high, num_bins + 1)


def _density(scores: np.ndarray, edges: np.ndarray) -> np.ndarray:
    # Normalised by all points, not only those inside the edges, so clipped tails lower the bars honestly.
    counts, _ = np.histogram(scores, bins=edges)
    return counts / (scores.size * np.diff(edges))


def _histogram_figure(id_name: str, ood_name: str, id_scores: dict[str, np.ndarray],
                      ood_scores: dict[str, np.ndarray], titles: dict[str, str]) -> Figure:
    num_columns = min(PANELS_PER_ROW, len(id_scores))
    num_rows = math.ceil(len(id_scores) / num_columns)
    width, height = 4.0 * num_columns, 2.5 * num_rows + 1.1
    figure = Figure(figsize=(width, height), dpi=DPI)
    # fixed margins in inches: constrained layout measures every tick label and is several times slower
    figure.subplots_adjust(left=0.3 / width, right=1 - 0.3 / width, bottom=0.55 / height, top=1 - 0.95 / height,
                           wspace=0.08, hspace=0.4)
    axes = figure.subplots(num_rows, num_columns, squeeze=False).ravel()
    for ax, detector in zip(axes, id_scores):
        id_values = np.asarray(id_scores[detector], dtype=np.float64).ravel()
        ood_values = np.asarray(ood_scores[detector], dtype=np.float64).ravel()
        edges = _shared_bin_edges(id_values, ood_values)
        ax.stairs(_density(id_values, edges), edges, fill=True, alpha=0.5, color="C0", label=f"ID ({id_name})")
        ax.stairs(_density(ood_values, edges), edges, fill=True, alpha=0.5, color="C3", label=ood_name)
        ax.set_title(titles[detector], fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.tick_params(axis="x", labelsize=8)
        ax.set_yticks([])                                # densities are per score unit, which differ by detector
    for ax in axes[len(id_scores):]:
        ax.set_visible(False)
    figure.suptitle(f"Score densities: ID {id_name} vs OOD {ood_name} (higher score = more in-distribution)",
                    y=1 - 0.12 / height, fontsize=11)
    figure.legend(*axes[0].get_legend_handles_labels(), loc="upper center", ncols=2, fontsize=9,
                  bbox_to_anchor=(0.5, 1 - 0.36 / height), frameon=False)
    return figure


def _roc_figure(id_name: str, ood_name: str, id_scores: dict[str, np.ndarray],
                ood_scores: dict[str, np.ndarray], aurocs: dict[str, float]) -> Figure:
    figure = Figure(figsize=(6.0, 5.5), dpi=DPI)
    figure.subplots_adjust(left=0.11, right=0.97, bottom=0.09, top=0.93)
    ax = figure.subplots()
    for detector, id_values in id_scores.items():
        id_values = np.asarray(id_values, dtype=np.float64).ravel()
        ood_values = np.asarray(ood_scores[detector], dtype=np.float64).ravel()
        is_id = np.concatenate([np.ones(id_values.size, dtype=int), np.zeros(ood_values.size, dtype=int)])
        fpr, tpr, _ = roc_curve(is_id, np.concatenate([id_values, ood_values]))
        ax.plot(fpr, tpr, linewidth=1.3, label=f"{detector} ({100 * aurocs[detector]:.2f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    ax.axhline(0.95, linestyle=":", color="black", linewidth=0.8)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="FPR (OOD accepted as ID)", ylabel="TPR (ID accepted)",
           title=f"ROC: ID {id_name} vs OOD {ood_name} (dotted: TPR 0.95)")
    ax.legend(title="AUROC (%)", fontsize=8, loc="lower right")
    return figure


def _png_writer(figure: Callable[[], Figure]) -> Callable[[Path], None]:
    """write(path) that draws the figure only when called, so a run holds one figure at a time."""
    return lambda path: figure().savefig(path, format="png", dpi=DPI)


def score_plot_writers(id_name: str, id_scores: dict[str, np.ndarray], ood_scores: dict[str, dict[str, np.ndarray]],
                       metrics: dict[str, dict[str, dict[str, float]]] | None = None
                       ) -> dict[str, Callable[[Path], None]]:
    """{file name: write(path)} per OOD set: scores_<set>.png (ID vs OOD histograms, one panel per detector),
    then roc_<set>.png, in the dicts' order; for `write_score_plots`, or `write_results(extra_files=...)` to
    replace them together with the tables. Inputs are checked here, the figures drawn by each write.

    `metrics[ood_set][detector]`, the `ood_metrics` dicts (fractions) the caller already has, saves recomputing
    them; None computes them."""
    if not id_scores:
        raise ValueError("id_scores has no detectors")
    file_names: dict[str, str] = {}
    for ood_name, scores in ood_scores.items():
        if set(scores) != set(id_scores):
            raise ValueError(f"OOD set {ood_name!r} has detectors {list(scores)}, ID has {list(id_scores)}")
        file_name = safe_file_name(ood_name)
        if file_name in file_names:
            raise ValueError(f"OOD sets {file_names[file_name]!r} and {ood_name!r} share the file name {file_name!r}")
        file_names[file_name] = ood_name

    writers: dict[str, Callable[[Path], None]] = {}
    for file_name, ood_name in file_names.items():
        set_metrics = (metrics[ood_name] if metrics is not None else
                       {detector: ood_metrics(id_scores[detector], ood_scores[ood_name][detector])
                        for detector in id_scores})
        titles = {detector: _format_title(detector, set_metrics[detector]) for detector in id_scores}
        aurocs = {detector: set_metrics[detector]["auroc"] for detector in id_scores}
        writers[f"scores_{file_name}.png"] = _png_writer(functools.partial(
            _histogram_figure, id_name, ood_name, id_scores, ood_scores[ood_name], titles))
        writers[f"roc_{file_name}.png"] = _png_writer(functools.partial(
            _roc_figure, id_name, ood_name, id_scores, ood_scores[ood_name], aurocs))
    return writers


def write_score_plots(output_dir: Path, id_name: str, id_scores: dict[str, np.ndarray],
                      ood_scores: dict[str, dict[str, np.ndarray]],
                      metrics: dict[str, dict[str, dict[str, float]]] | None = None) -> list[Path]:
    """Write `score_plot_writers`' PNGs into `output_dir`, each atomically; returns their paths (scores, roc per
    set). A run's results folder uses `write_results(extra_files=...)` instead, which replaces them as a set."""
    written = []
    for file_name, write in score_plot_writers(id_name, id_scores, ood_scores, metrics).items():
        write_atomically(Path(output_dir) / file_name, write)
        written.append(Path(output_dir) / file_name)
    return written
