"""python -m pipeline.tools.compare: paired bootstrap differences between two detectors of one run, from scores.npz."""
from __future__ import annotations

import numpy as np
import pytest

from ood_evaluation.bootstrap import HIGHER_IS_BETTER, METRICS
from ood_evaluation.resampling import sets_resample_counts
from ood_evaluation.metrics import ood_metrics
from pipeline.tools.compare import compare, main
from pipeline.report.scores import read_scores, scores_writer
from pipeline.result import RunScores


def synthetic_run(seed: int = 0) -> RunScores:
    """Detector 'good' separates ID from OOD better than 'weak' on two OOD sets; 'tied' has many equal scores."""
    rng = np.random.default_rng(seed)
    sizes = {"id": 60, "near": 40, "far": 30}
    shift = {"id": 1.5, "near": 0.4, "far": 0.0}
    scores = {}
    for name, size in sizes.items():
        noise = rng.normal(size=size)
        scores[name] = {"good": shift[name] * 2 + noise, "weak": shift[name] + rng.normal(size=size),
                        "tied": np.round(shift[name] + noise, 0)}
    ids = {name: np.array([f"{name}-{i}" for i in range(size)]) for name, size in sizes.items()}
    return RunScores("id", ["good", "weak", "tied"], ids, scores)


def line(table: list[list[str]], metric: str, name: str) -> list[str]:
    (found,) = [row for row in table[1:] if row[0] == metric and row[1] == name]
    return found


def test_a_detector_against_itself_differs_by_exactly_zero_everywhere():
    table = compare(synthetic_run(), "tied", "tied", list(METRICS), resamples=200)
    for row in table[1:]:
        assert row[4] == "+0.00" and row[5] == "[+0.00, +0.00]" and row[6] == "0.000", row


@pytest.mark.slow  # restates 107 resamples of two sets with scikit-learn, one at a time
def test_every_line_restates_one_set_of_paired_resamples_that_draw_the_id_images_once():
    stored, resamples, seed, metrics = synthetic_run(), 107, 3, ["auroc", "fpr95", "aupr_out"]
    table = compare(stored, "good", "weak", metrics, resamples, seed)
    # restated: the resamples' counts (the ID images drawn once for both sets), scikit-learn's metrics of the
    # repeated scores of each detector, their difference per set, and the average of the two sets' differences
    id_counts, ood_counts = sets_resample_counts(60, [40, 30], resamples, seed)

    def resampled(detector: str, name: str, row: int, counts: np.ndarray) -> dict[str, float]:
        return ood_metrics(np.repeat(stored.scores["id"][detector], id_counts[row]),
                           np.repeat(stored.scores[name][detector], counts[row]))
    differences = {}
    for name, counts in zip(("near", "far"), ood_counts):
        per_row = [(resampled("good", name, row, counts), resampled("weak", name, row, counts))
                   for row in range(resamples)]
        differences[name] = np.array([[good[metric] - weak[metric] for metric in metrics] for good, weak in per_row])
    differences["Average"] = (differences["near"] + differences["far"]) / 2
    for name, sets in (("near", ["near"]), ("far", ["far"]), ("Average", ["near", "far"])):
        for column, metric in enumerate(metrics):
            low, high = np.percentile(differences[name][:, column], [2.5, 97.5])
            better = np.mean((1 if HIGHER_IS_BETTER[metric] else -1) * differences[name][:, column] > 0)
            points = [np.mean([ood_metrics(stored.scores["id"][detector], stored.scores[ood][detector])[metric]
                               for ood in sets]) for detector in ("good", "weak")]
            assert line(table, metric, name)[2:] == [
                f"{100 * points[0]:.2f}", f"{100 * points[1]:.2f}", f"{100 * (points[0] - points[1]):+.2f}",
                f"[{100 * low:+.2f}, {100 * high:+.2f}]", f"{better:.3f}"], (name, metric)
    assert float(line(table, "auroc", "Average")[6]) > 0.95  # 'good' is clearly better: the test has teeth


def test_command_line_reads_the_runs_scores_and_names_unknown_detectors(tmp_path, capsys):
    stored = synthetic_run()
    scores_writer(stored)(tmp_path / "scores.npz")
    assert read_scores(tmp_path).detectors == ["good", "weak", "tied"]
    assert main([str(tmp_path), "good", "weak", "--resamples", "50"]) == 0
    printed = capsys.readouterr().out
    assert "P(good better)" in printed and "not other bank draws nor other OOD sets" in printed
    assert main([str(tmp_path), "good", "Weak"]) == 2
    error = capsys.readouterr().err
    assert "'Weak'" in error and "'weak'" in error  # the name and the suggestion
    assert main([str(tmp_path / "missing"), "good", "weak"]) == 2
    assert str(tmp_path / "missing" / "scores.npz") in capsys.readouterr().err


@pytest.mark.parametrize("argv, value", [(["--resamples", "0"], "got 0"), (["--level", "1.5"], "1.5"),
                                         (["--seed", "-1"], "-1")])
def test_bad_resampling_options_are_one_error_line(tmp_path, argv, value, capsys):
    assert main([str(tmp_path), "a", "b", *argv]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and argv[0] in error and value in error


def test_a_comparison_that_would_take_hours_is_refused_with_the_estimate(tmp_path, capsys):
    scores_writer(synthetic_run())(tmp_path / "scores.npz")
    assert main([str(tmp_path), "good", "weak", "--resamples", "1000000000"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--resamples" in error and "1000000000" in error and "hours" in error
