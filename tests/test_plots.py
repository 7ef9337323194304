"""Score plots: files per OOD set in order, valid PNGs, safe file names, degenerate scores, real metrics in titles;
the ROC figure's log FPR axis, curve styles and FPR95 markers, and histogram bins chosen from the data."""
from __future__ import annotations

from pathlib import Path

import matplotlib.colors
import matplotlib.image
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from sklearn.metrics import roc_curve

from ood_evaluation.metrics import ood_metrics
from pipeline.report.plots import (MAX_BINS, MIN_BINS, MIN_BINS_PER_SET, _histogram_figure, _roc_figure,
                                   panel_title, safe_file_name, write_score_plots)
from pipeline.result import RunScores

DETECTORS = ["msp", "energy", "nnguide"]


def synthetic_scores(seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    """Three detectors on very different scales; OOD shifted down (higher = more in-distribution)."""
    rng = np.random.default_rng(seed)
    scales = {"msp": 0.1, "energy": 10.0, "nnguide": 1000.0}
    id_scores = {name: rng.normal(1.0, 1.0, 500) * scale for name, scale in scales.items()}
    ood_scores = {
        "openimage-o": {name: rng.normal(0.0, 1.0, 300) * scale for name, scale in scales.items()},
        "textures/dtd v1": {name: rng.normal(-1.0, 1.0, 200) * scale for name, scale in scales.items()},
    }
    return id_scores, ood_scores


def run_scores(id_set: str, id_scores: dict[str, np.ndarray], ood_scores: dict[str, dict[str, np.ndarray]]
               ) -> RunScores:
    """A run's scores of these sets, with made-up image ids."""
    scores = {id_set: id_scores, **ood_scores}
    image_ids = {name: np.array([str(index) for index in range(len(next(iter(by_detector.values()))))])
                 for name, by_detector in scores.items()}
    return RunScores(id_set, list(id_scores), image_ids, scores)


@pytest.fixture(scope="module")
def synthetic_plots(tmp_path_factory) -> tuple[Path, list[Path]]:
    """write_score_plots of synthetic_scores() into a folder of its own: (the folder, the paths it returned).
    Read-only: shared by the tests of the files and of precomputed metrics."""
    folder = tmp_path_factory.mktemp("synthetic") / "plots"
    id_scores, ood_scores = synthetic_scores()
    return folder, write_score_plots(folder, run_scores("imagenet", id_scores, ood_scores))


def test_writes_two_valid_pngs_per_ood_set_in_order(synthetic_plots):
    folder, paths = synthetic_plots
    assert [path.name for path in paths] == ["scores_openimage-o.png", "roc_openimage-o.png",
                                             "scores_textures_dtd_v1.png", "roc_textures_dtd_v1.png"]
    assert sorted(path.name for path in folder.iterdir()) == sorted(path.name for path in paths)
    for path in paths:
        image = matplotlib.image.imread(path)
        height, width, channels = image.shape
        assert 300 < height < 2000 and 300 < width < 2000 and channels in (3, 4)
        assert image[..., :3].std() > 0.01          # something was drawn, not a blank canvas
        assert path.stat().st_size < 200_000


def test_safe_file_name_keeps_only_portable_characters():
    assert safe_file_name("openimage-o") == "openimage-o"
    assert safe_file_name("ssb_hard.v2") == "ssb_hard.v2"
    assert safe_file_name("textures/dtd v1") == "textures_dtd_v1"
    assert safe_file_name("../étude") == "..__tude"          # ASCII only: portable everywhere


def test_sets_whose_file_names_collide_are_refused(tmp_path):
    id_scores, ood_scores = synthetic_scores()
    with pytest.raises(ValueError, match="share the file name"):
        write_score_plots(tmp_path, run_scores("imagenet", id_scores, {"a/b": ood_scores["openimage-o"],
                                                                        "a b": ood_scores["openimage-o"]}))


def test_mismatched_detectors_are_refused(tmp_path):
    id_scores, ood_scores = synthetic_scores()
    with pytest.raises(ValueError, match="has detectors"):
        write_score_plots(tmp_path, run_scores("imagenet", id_scores,
                                               {"openimage-o": {"msp": ood_scores["openimage-o"]["msp"]}}))


def test_constant_scores_and_a_three_point_set_do_not_raise(tmp_path):
    id_scores = {"constant": np.full(50, 2.0), "tiny": np.array([0.3, 0.1, 0.2]), "normal": np.linspace(0, 1, 40)}
    ood_scores = {"same-constant": {"constant": np.full(7, 2.0), "tiny": np.array([0.0, 0.1, -0.1]),
                                    "normal": np.array([0.5])}}
    paths = write_score_plots(tmp_path, run_scores("cifar10", id_scores, ood_scores))
    assert all(matplotlib.image.imread(path).ndim == 3 for path in paths)


def test_panel_title_of_perfect_separation():
    title = panel_title("nnguide", np.array([3.0, 2.0, 1.0]), np.array([0.0, -1.0]))
    assert title == "nnguide  AUROC 100.00  FPR95 0.00"


def test_panel_title_uses_ood_metrics_in_percent():
    # ID 4, 3, 1; OOD 2, 0: AUROC 5/6 and FPR95 1/2 (hand-checked in test_metrics).
    assert panel_title("knn", np.array([4.0, 3.0, 1.0]), np.array([2.0, 0.0])) == "knn  AUROC 83.33  FPR95 50.00"


# ---- ROC figure: log FPR axis, every curve visible, FPR95 marked where ood_metrics puts it ----------------

PIPELINE_DETECTORS = ["nnguide", "knn", "energy", "msp", "maxlogit", "kl", "vim", "mahalanobis", "ssd"]


def roc_inputs(num_id: int = 400, num_ood: int = 250, seed: int = 0):
    """The pipeline's nine detectors at AUROCs of about 98% to 100%: energy and maxlogit give identical scores
    (their curves coincide), ssd separates perfectly (FPR95 = 0, which a plain log axis cannot show)."""
    rng = np.random.default_rng(seed)
    id_scores, ood_scores = {}, {}
    for index, detector in enumerate(PIPELINE_DETECTORS):
        id_scores[detector] = rng.normal(3.0 + 0.3 * index, 1.0, num_id)
        ood_scores[detector] = rng.normal(0.0, 1.0, num_ood)
    id_scores["maxlogit"], ood_scores["maxlogit"] = id_scores["energy"].copy(), ood_scores["energy"].copy()
    id_scores["ssd"], ood_scores["ssd"] = rng.uniform(10, 11, num_id), rng.uniform(0, 1, num_ood)
    metrics = {detector: ood_metrics(id_scores[detector], ood_scores[detector]) for detector in PIPELINE_DETECTORS}
    return id_scores, ood_scores, metrics


def lines_by_gid(figure) -> dict:
    return {line.get_gid(): line for line in figure.axes[0].get_lines() if line.get_gid()}


def test_roc_fpr_axis_is_logarithmic_down_to_one_over_the_ood_count_and_shows_fpr_zero():
    id_scores, ood_scores, metrics = roc_inputs(num_ood=250)
    figure = _roc_figure("imagenet", "openimage-o", id_scores, ood_scores, metrics)
    ax = figure.axes[0]
    assert ax.get_xscale() == "symlog"                  # logarithmic above linthresh, linear from there to 0
    assert ax.xaxis.get_transform().linthresh == pytest.approx(1 / 250)
    assert ax.get_xlim() == (0.0, 1.0)
    # The decades of log axis above 1/250 take many times the width of the linear stretch below it.
    to_axis = ax.xaxis.get_transform().transform
    assert to_axis(np.array([1.0]))[0] - to_axis(np.array([1 / 250]))[0] > 4 * to_axis(np.array([1 / 250]))[0]
    # The perfect detector's FPR95 is 0: its marker is at x = 0, inside the axis.
    assert metrics["ssd"]["fpr95"] == 0.0
    assert lines_by_gid(figure)["ssd fpr95"].get_xdata()[0] == 0.0


def test_every_roc_curve_has_a_visible_distinct_colour_and_line_style():
    id_scores, ood_scores, metrics = roc_inputs()
    lines = lines_by_gid(_roc_figure("imagenet", "openimage-o", id_scores, ood_scores, metrics))
    curves = [lines[f"{detector} roc"] for detector in PIPELINE_DETECTORS]
    for curve in curves:
        assert curve.get_visible() and curve.get_linewidth() >= 1.0 and (curve.get_alpha() or 1.0) == 1.0
    colours = [matplotlib.colors.to_hex(curve.get_color()) for curve in curves]
    styles = [curve.get_linestyle() for curve in curves]
    assert len(set(colours)) == len(curves)                      # distinct colours ...
    assert len(set(styles)) >= 3                                  # ... and line styles cycling too
    assert len(set(zip(colours, styles))) == len(curves)
    # energy and maxlogit coincide: the one drawn later is broken and thinner, so the earlier shows through.
    energy, maxlogit = lines["energy roc"], lines["maxlogit roc"]
    assert np.array_equal(energy.get_xydata(), maxlogit.get_xydata())
    assert maxlogit.get_linestyle() in ("--", "-.", ":") and maxlogit.get_linewidth() < energy.get_linewidth()


def test_pairs_of_colour_and_line_style_stay_distinct_beyond_ten_detectors():
    rng = np.random.default_rng(1)
    names = [f"detector{index}" for index in range(25)]
    id_scores = {name: rng.normal(2.0, 1.0, 30) for name in names}
    ood_scores = {name: rng.normal(0.0, 1.0, 20) for name in names}
    metrics = {name: ood_metrics(id_scores[name], ood_scores[name]) for name in names}
    lines = lines_by_gid(_roc_figure("imagenet", "many", id_scores, ood_scores, metrics))
    pairs = {(matplotlib.colors.to_hex(lines[f"{name} roc"].get_color()), lines[f"{name} roc"].get_linestyle())
             for name in names}
    assert len(pairs) == len(names)


def first_tpr_reaching(fpr: np.ndarray, tpr: np.ndarray, level: float = 0.95) -> int:
    return int(np.argmax(tpr >= level))


def on_staircase(x: float, y: float, curve_x: np.ndarray, curve_y: np.ndarray) -> bool:
    """Whether (x, y) lies on one of the curve's horizontal or vertical segments."""
    for x0, y0, x1, y1 in zip(curve_x[:-1], curve_y[:-1], curve_x[1:], curve_y[1:]):
        if (x0 == x1 == x and min(y0, y1) <= y <= max(y0, y1)) or (y0 == y1 == y and x0 <= x <= x1):
            return True
    return False


def test_fpr95_marker_sits_on_the_curve_at_the_fpr_ood_metrics_reports():
    # 17 ID points: TPR 16/17 = 0.941 is nearer 0.95 than 17/17, so ood_metrics' FPR95 (nearest TPR) differs
    # from the FPR where the TPR first reaches 0.95; the marker must follow ood_metrics.
    id_scores = {"knn": np.array([9.0, 8.5, 8.0, 7.5, 7.0, 6.5, 6.0, 5.5, 5.0, 4.5, 4.0, 3.5, 3.0, 2.5, 2.0, 1.5,
                                  -1.0])}
    ood_scores = {"knn": np.array([1.8, 1.0, 0.5, 0.0, -0.5, -2.0, -3.0, -4.0])}
    metrics = {"knn": ood_metrics(id_scores["knn"], ood_scores["knn"])}
    is_id = np.r_[np.ones(17), np.zeros(8)]
    fpr, tpr, _ = roc_curve(is_id, np.r_[id_scores["knn"], ood_scores["knn"]], drop_intermediate=False)
    assert fpr[first_tpr_reaching(fpr, tpr)] != metrics["knn"]["fpr95"]         # the two rules differ here
    lines = lines_by_gid(_roc_figure("imagenet", "inaturalist", id_scores, ood_scores, metrics))
    (marker_x,), (marker_y,) = lines["knn fpr95"].get_xdata(), lines["knn fpr95"].get_ydata()
    assert marker_x == metrics["knn"]["fpr95"] == pytest.approx(1 / 8)
    assert marker_y == pytest.approx(16 / 17)
    assert on_staircase(marker_x, marker_y, lines["knn roc"].get_xdata(), lines["knn roc"].get_ydata())


def test_fpr95_markers_of_random_scores_match_ood_metrics():
    id_scores, ood_scores, metrics = roc_inputs(num_id=333, num_ood=97, seed=3)
    lines = lines_by_gid(_roc_figure("imagenet", "openimage-o", id_scores, ood_scores, metrics))
    for detector in PIPELINE_DETECTORS:
        marker = lines[f"{detector} fpr95"]
        assert marker.get_xdata()[0] == metrics[detector]["fpr95"]
        assert marker.get_marker() == lines[f"{detector} roc"].get_marker() != "None"
        assert on_staircase(marker.get_xdata()[0], marker.get_ydata()[0], lines[f"{detector} roc"].get_xdata(),
                            lines[f"{detector} roc"].get_ydata())


def test_roc_legend_carries_auroc_and_fpr95_of_each_detector():
    id_scores, ood_scores, metrics = roc_inputs()
    figure = _roc_figure("imagenet", "openimage-o", id_scores, ood_scores, metrics)
    (legend,) = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == [
        f"{detector}  AUROC {100 * metrics[detector]['auroc']:.2f}  FPR95 {100 * metrics[detector]['fpr95']:.2f}"
        for detector in PIPELINE_DETECTORS] + ["chance", "TPR 0.95"]


def test_roc_reference_lines_are_in_the_legend_and_no_label_sits_among_the_curves():
    id_scores, ood_scores, metrics = roc_inputs()
    figure = _roc_figure("imagenet", "openimage-o", id_scores, ood_scores, metrics)
    ax = figure.axes[0]
    assert not ax.texts                                   # "TPR 0.95" is a legend entry, not text the curves cross
    lines = lines_by_gid(figure)
    assert set(lines["tpr 0.95"].get_ydata()) == {0.95}
    np.testing.assert_array_equal(lines["chance"].get_xdata(), lines["chance"].get_ydata())


def test_fpr95_markers_at_fpr_zero_are_drawn_whole_and_the_linear_stretch_is_narrow():
    id_scores, ood_scores, metrics = roc_inputs(num_ood=250)
    figure = _roc_figure("imagenet", "openimage-o", id_scores, ood_scores, metrics)
    marker = lines_by_gid(figure)["ssd fpr95"]
    assert marker.get_xdata()[0] == 0.0 and marker.get_clip_on() is False   # not cut in half by the axis
    to_axis = figure.axes[0].xaxis.get_transform().transform
    linear = to_axis(np.array([1 / 250]))[0] - to_axis(np.array([0.0]))[0]
    decade = to_axis(np.array([10 / 250]))[0] - to_axis(np.array([1 / 250]))[0]
    assert 0 < linear <= 0.3 * decade  # linscale 0.25: about a quarter of a decade (0.28 with base 10)


def test_roc_refuses_an_fpr95_that_is_not_on_the_curve():
    id_scores, ood_scores, metrics = roc_inputs()
    metrics["knn"] = {**metrics["knn"], "fpr95": 0.123456}
    with pytest.raises(ValueError, match="knn: fpr95 0.123456 is no point of its ROC curve"):
        _roc_figure("imagenet", "openimage-o", id_scores, ood_scores, metrics)


def test_a_tie_between_id_and_ood_scores_is_drawn_as_the_straight_roc_segment_it_is():
    # All 10 ID and 10 OOD scores tied: the ROC is the diagonal, which the log axis must not draw as one chord.
    id_scores, ood_scores = {"msp": np.ones(10)}, {"msp": np.ones(10)}
    metrics = {"msp": ood_metrics(id_scores["msp"], ood_scores["msp"])}
    line = lines_by_gid(_roc_figure("cifar10", "tied", id_scores, ood_scores, metrics))["msp roc"]
    assert line.get_xdata().size > 10
    assert np.allclose(line.get_xdata(), line.get_ydata())


# ---- histogram bins -------------------------------------------------------------------------------------

def histogram_bins(id_scores: np.ndarray, ood_scores: np.ndarray) -> int:
    figure = _histogram_figure("cifar10", "ood", {"knn": id_scores}, {"knn": ood_scores}, {"knn": "knn"})
    id_stairs, ood_stairs = figure.axes[0].patches
    assert np.array_equal(id_stairs.get_data().edges, ood_stairs.get_data().edges)     # shared bins
    return id_stairs.get_data().edges.size - 1


def test_histogram_bins_grow_with_small_sets():
    rng = np.random.default_rng(0)
    small = histogram_bins(rng.normal(1.0, 1.0, 20), rng.normal(-1.0, 1.0, 12))
    larger = histogram_bins(rng.normal(1.0, 1.0, 400), rng.normal(-1.0, 1.0, 240))
    assert 5 < small < larger


def test_histogram_bins_stay_bounded_for_large_sets_and_ignore_outliers():
    rng = np.random.default_rng(0)
    id_scores, ood_scores = rng.normal(1.0, 1.0, 200_000), rng.normal(-1.0, 1.0, 100_000)
    id_scores[:10] = 1e6                                   # 0.005% outliers, outside the 99.9% quantile
    figure = _histogram_figure("imagenet", "ood", {"knn": id_scores}, {"knn": ood_scores}, {"knn": "knn"})
    edges = figure.axes[0].patches[0].get_data().edges
    assert edges.size - 1 == MAX_BINS
    assert edges[-1] < 10


def test_constant_scores_get_the_minimum_number_of_bins():
    assert histogram_bins(np.full(50, 2.0), np.full(7, 2.0)) == MIN_BINS


def test_histograms_label_their_axes_and_show_the_scores_themselves():
    """x: the score (higher = in-distribution), y: density with its ticks; tick labels are the scores, with no
    detached offset (such as '+2.302e3') beside the axis."""
    rng = np.random.default_rng(0)
    id_scores = {"nnguide": 2302.5 + rng.normal(0, 0.02, 300)}
    ood_scores = {"nnguide": 2302.4 + rng.normal(0, 0.05, 200)}
    figure = _histogram_figure("imagenet", "sun", id_scores, ood_scores, {"nnguide": "nnguide"})
    FigureCanvasAgg(figure).draw()
    ax = figure.axes[0]
    assert "score" in ax.get_xlabel() and "higher = in-distribution" in ax.get_xlabel()
    assert ax.get_ylabel() == "density" and len(ax.get_yticks()) >= 2
    assert ax.xaxis.get_offset_text().get_text() == "" and ax.yaxis.get_offset_text().get_text() == ""
    assert all(label.get_text().startswith("2302") for label in ax.get_xticklabels() if label.get_text())


def test_a_tight_id_distribution_beside_a_wide_ood_one_spans_several_bins():
    """The scores of a confident classifier: ID packed near one value, OOD spread wide. Both are drawn as shapes."""
    rng = np.random.default_rng(1)
    id_scores, ood_scores = rng.normal(0.0, 0.02, 500), rng.normal(0.0, 1.0, 500)
    figure = _histogram_figure("cifar10", "svhn", {"msp": id_scores}, {"msp": ood_scores}, {"msp": "msp"})
    id_stairs, ood_stairs = figure.axes[0].patches
    assert np.count_nonzero(id_stairs.get_data().values) >= MIN_BINS_PER_SET
    assert np.count_nonzero(ood_stairs.get_data().values) >= MIN_BINS_PER_SET
