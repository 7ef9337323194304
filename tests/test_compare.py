"""python -m pipeline.compare: paired bootstrap differences between two detectors of one run, from scores.npz."""
from __future__ import annotations

import numpy as np
import pytest

from ood_detectors.bootstrap import HIGHER_IS_BETTER, METRICS, paired_bootstrap
from ood_detectors.metrics import ood_metrics
from pipeline.compare import RESAMPLES_PER_BLOCK, compare, main
from pipeline.scores import RunScores, read_scores, scores_writer


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


@pytest.mark.slow  # restates 107 resamples with scikit-learn, one at a time
def test_per_set_lines_are_the_paired_bootstrap_and_the_average_restates_it_with_shared_id_draws():
    stored, resamples, seed = synthetic_run(), RESAMPLES_PER_BLOCK + 7, 3  # two blocks, the second partial
    table = compare(stored, "good", "weak", ["auroc", "fpr95", "aupr_out"], resamples, seed)
    id_a, id_b = stored.scores["id"]["good"], stored.scores["id"]["weak"]
    for name in ("near", "far"):
        paired = paired_bootstrap(id_a, stored.scores[name]["good"], id_b, stored.scores[name]["weak"], resamples,
                                  seed)
        assert line(table, "auroc", name)[5] == f"[{100 * paired['auroc'].low:+.2f}, {100 * paired['auroc'].high:+.2f}]"

    # the average, restated with explicit resampled score arrays and sklearn's metrics, one resample at a time
    rng = np.random.default_rng(seed)
    differences = []
    for start in range(0, resamples, RESAMPLES_PER_BLOCK):
        rows = min(RESAMPLES_PER_BLOCK, resamples - start)
        id_counts = rng.multinomial(60, np.full(60, 1 / 60), size=rows)
        ood_counts = {name: rng.multinomial(size, np.full(size, 1 / size), size=rows)
                      for name, size in (("near", 40), ("far", 30))}
        for row in range(rows):
            per_set = []
            for name in ("near", "far"):
                metrics = [ood_metrics(np.repeat(stored.scores["id"][detector], id_counts[row]),
                                       np.repeat(stored.scores[name][detector], ood_counts[name][row]))
                           for detector in ("good", "weak")]
                per_set.append([metrics[0][metric] - metrics[1][metric] for metric in METRICS])
            differences.append(np.mean(per_set, axis=0))
    differences = np.array(differences)
    for column, metric in enumerate(METRICS):
        if metric not in ("auroc", "fpr95", "aupr_out"):
            continue
        low, high = np.percentile(differences[:, column], [2.5, 97.5])
        better = np.mean((1 if HIGHER_IS_BETTER[metric] else -1) * differences[:, column] > 0)
        points = [np.mean([ood_metrics(stored.scores["id"][detector], stored.scores[name][detector])[metric]
                           for name in ("near", "far")]) for detector in ("good", "weak")]
        assert line(table, metric, "Average")[2:] == [
            f"{100 * points[0]:.2f}", f"{100 * points[1]:.2f}", f"{100 * (points[0] - points[1]):+.2f}",
            f"[{100 * low:+.2f}, {100 * high:+.2f}]", f"{better:.3f}"]
    assert float(line(table, "auroc", "Average")[6]) > 0.95  # 'good' is clearly better: the test has teeth


def test_command_line_reads_the_runs_scores_and_names_unknown_detectors(tmp_path, capsys):
    stored = synthetic_run()
    write = scores_writer("id", stored.scores["id"], {name: stored.scores[name] for name in ("near", "far")},
                          {name: list(ids) for name, ids in stored.image_ids.items()})
    write(tmp_path / "scores.npz")
    assert read_scores(tmp_path).detectors == ["good", "weak", "tied"]
    assert main([str(tmp_path), "good", "weak", "--resamples", "50"]) == 0
    printed = capsys.readouterr().out
    assert "P(good better)" in printed and "not other bank draws nor other OOD sets" in printed
    assert main([str(tmp_path), "good", "Weak"]) == 2
    assert "detector 'Weak' is not in this run (did you mean 'weak'?)" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), "good", "weak"]) == 2
    assert "scores.npz does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--resamples", "0"], ["--level", "1.5"]])
def test_bad_resampling_options_are_one_error_line(tmp_path, argv, capsys):
    assert main([str(tmp_path), "a", "b", *argv]) == 2
    assert capsys.readouterr().err.startswith("error: --resamples must be positive")
