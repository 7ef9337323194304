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


def test_stored_scores_are_checked_before_they_are_believed(tmp_path, capsys):
    """scores.npz against the run's manifest and against itself: a file changed since the run wrote it, an
    interrupted run's folder, a truncated file and scores that do not match their ids are each one error line."""
    from tests.fake_results import fake_result
    from pipeline.report.outputs import write_result
    rows = [{"model": "m", "train_data": "t", "id_data": "id", "ood_data": "near", "detector": detector,
             "auroc": 90.0, "fpr95": 30.0, "id_acc": 75.0} for detector in ("good", "weak")]
    write_result(fake_result(rows), tmp_path / "run")
    assert main([str(tmp_path / "run"), "good", "weak", "--resamples", "20"]) == 0
    capsys.readouterr()

    def refused(folder, *fragments):
        assert main([str(folder), "good", "weak", "--resamples", "20"]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and all(fragment in error for fragment in fragments), error

    scores = tmp_path / "run/scores.npz"
    original = scores.read_bytes()
    scores.write_bytes(original[:len(original) // 2])                     # truncated after the run
    refused(tmp_path / "run", str(scores), "checksum")
    manifest = tmp_path / "run/results-manifest.json"
    manifest.write_text(manifest.read_text().replace('"complete": true', '"complete": false'))
    scores.write_bytes(original)
    refused(tmp_path / "run", "interrupted", str(tmp_path / "run"))
    manifest.unlink()                                                   # no manifest: read as it is, but checked
    scores.write_bytes(original[:len(original) // 2])
    refused(tmp_path / "run", str(scores))
    stored = synthetic_run()
    stored.image_ids["near"] = stored.image_ids["near"][:-1]             # one id fewer than the scores
    scores_writer_unchecked = {**{f"ids:{name}": ids for name, ids in stored.image_ids.items()},
                               **{f"scores:{name}": np.stack(list(by.values())) for name, by in stored.scores.items()},
                               "detectors": np.array(stored.detectors), "sets": np.array(list(stored.scores))}
    (tmp_path / "bad").mkdir()
    np.savez(tmp_path / "bad/scores.npz", **scores_writer_unchecked)
    refused(tmp_path / "bad", "'near'", "expected finite")


def test_a_comparison_that_would_exhaust_memory_is_refused_with_the_estimate(tmp_path, capsys):
    """Few scores, many resamples: quick to draw, but the resampled metrics alone would take gigabytes."""
    scores_writer(synthetic_run())(tmp_path / "scores.npz")
    assert main([str(tmp_path), "good", "weak", "--resamples", "20000000"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "20000000" in error and "GiB" in error
