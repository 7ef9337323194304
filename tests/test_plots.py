"""Score plots: files per OOD set in order, valid PNGs, safe file names, degenerate scores, real metrics in titles."""
from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest

from ood_detectors.metrics import ood_metrics
from pipeline.plots import panel_title, safe_file_name, write_score_plots

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


def test_writes_two_valid_pngs_per_ood_set_in_order(tmp_path):
    id_scores, ood_scores = synthetic_scores()
    paths = write_score_plots(tmp_path / "plots", "imagenet", id_scores, ood_scores)
    assert [path.name for path in paths] == ["scores_openimage-o.png", "roc_openimage-o.png",
                                             "scores_textures_dtd_v1.png", "roc_textures_dtd_v1.png"]
    assert sorted(path.name for path in (tmp_path / "plots").iterdir()) == sorted(path.name for path in paths)
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
        write_score_plots(tmp_path, "imagenet", id_scores,
                          {"a/b": ood_scores["openimage-o"], "a b": ood_scores["openimage-o"]})


def test_mismatched_detectors_are_refused(tmp_path):
    id_scores, ood_scores = synthetic_scores()
    with pytest.raises(ValueError, match="has detectors"):
        write_score_plots(tmp_path, "imagenet", id_scores, {"openimage-o": {"msp": ood_scores["openimage-o"]["msp"]}})


def test_constant_scores_and_a_three_point_set_do_not_raise(tmp_path):
    id_scores = {"constant": np.full(50, 2.0), "tiny": np.array([0.3, 0.1, 0.2]), "normal": np.linspace(0, 1, 40)}
    ood_scores = {"same-constant": {"constant": np.full(7, 2.0), "tiny": np.array([0.0, 0.1, -0.1]),
                                    "normal": np.array([0.5])}}
    paths = write_score_plots(tmp_path, "cifar10", id_scores, ood_scores)
    assert all(matplotlib.image.imread(path).ndim == 3 for path in paths)


def test_panel_title_of_perfect_separation():
    title = panel_title("nnguide", np.array([3.0, 2.0, 1.0]), np.array([0.0, -1.0]))
    assert title == "nnguide  AUROC 100.00  FPR95 0.00"


def test_panel_title_uses_ood_metrics_in_percent():
    # ID 4, 3, 1; OOD 2, 0: AUROC 5/6 and FPR95 1/2 (hand-checked in test_metrics).
    assert panel_title("knn", np.array([4.0, 3.0, 1.0]), np.array([2.0, 0.0])) == "knn  AUROC 83.33  FPR95 50.00"


def test_precomputed_metrics_give_the_same_files(tmp_path):
    id_scores, ood_scores = synthetic_scores()
    metrics = {name: {detector: ood_metrics(id_scores[detector], scores[detector]) for detector in DETECTORS}
               for name, scores in ood_scores.items()}
    computed = write_score_plots(tmp_path / "computed", "imagenet", id_scores, ood_scores)
    given = write_score_plots(tmp_path / "given", "imagenet", id_scores, ood_scores, metrics=metrics)
    for left, right in zip(computed, given):
        assert np.array_equal(matplotlib.image.imread(left), matplotlib.image.imread(right))
