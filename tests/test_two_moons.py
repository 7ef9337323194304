"""The two-moons figure: a valid three-panel PNG, and the score behaviours it is drawn to show."""
from __future__ import annotations

import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from scipy.stats import spearmanr

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


def test_energy_is_overconfident_far_from_the_data(scores: dict[str, np.ndarray]) -> None:
    far = scores["distance"] > FAR
    assert scores["energy"][far].max() > scores["energy_train"].max()


def test_knn_is_confined_to_the_data(scores: dict[str, np.ndarray]) -> None:
    far = scores["distance"] > FAR
    assert np.median(scores["knn"][far]) < np.percentile(scores["knn_train"], 5)


def test_nnguide_keeps_the_classifier_ranking_on_the_data(scores: dict[str, np.ndarray]) -> None:
    correlation = spearmanr(scores["nnguide_train"], scores["energy_train"]).statistic
    assert correlation > 0.9
