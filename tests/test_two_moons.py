"""The two-moons figure: a valid three-panel PNG, and the score behaviours it is drawn to show."""
from __future__ import annotations

import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "figures"))
from two_moons import render, scores_on_grid  # noqa: E402

FAR = 1.5  # grid points at least this far from every training point count as far from the data


@pytest.fixture(scope="module")
def scores() -> dict[str, np.ndarray]:
    return scores_on_grid(grid=30)


def test_render_writes_a_three_panel_png(tmp_path: Path) -> None:
    output = render(tmp_path / "figure" / "moons.png", grid=30)
    assert output == tmp_path / "figure" / "moons.png"
    image = matplotlib.image.imread(output)
    assert image.shape[0] > 100 and image.shape[1] > 2 * image.shape[0]


def far_above_the_data(scores: dict[str, np.ndarray], name: str) -> float:
    """Fraction of far grid points scoring above the 5th percentile of the training points' scores."""
    far = scores["distance"] > FAR
    return float((scores[name][far] > np.percentile(scores[f"{name}_train"], 5)).mean())


def test_the_classifier_is_overconfident_far_from_the_data(scores: dict[str, np.ndarray]) -> None:
    assert far_above_the_data(scores, "msp") > 0.5


def test_knn_and_nnguide_are_confined_to_the_data(scores: dict[str, np.ndarray]) -> None:
    assert far_above_the_data(scores, "knn") < 0.05
    assert far_above_the_data(scores, "nnguide") < 0.05


def test_nnguide_keeps_the_classifier_doubt_at_the_decision_boundary(scores: dict[str, np.ndarray]) -> None:
    """The training points the classifier is least sure of (lowest MSP) keep low NNGuide scores too."""
    doubtful = scores["msp_train"] <= np.percentile(scores["msp_train"], 10)
    assert np.median(scores["nnguide_train"][doubtful]) < np.percentile(scores["nnguide_train"][~doubtful], 10)


def test_with_an_energy_base_the_toy_does_not_confine_nnguide() -> None:
    """Recorded, not hidden: the energy grows faster far away than this toy's guidance shrinks."""
    energy_scores = scores_on_grid(grid=30, base="energy")
    assert far_above_the_data(energy_scores, "energy") > 0.5
    assert far_above_the_data(energy_scores, "nnguide") > 0.5
