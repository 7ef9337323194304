"""`python main.py` with no arguments: the offline demo through the real pipeline."""
from __future__ import annotations

import csv

import pytest

import main

DETECTORS = ["nnguide", "knn", "energy", "msp", "maxlogit", "kl", "vim", "mahalanobis", "ssd"]


@pytest.mark.slow  # trains the demo's network, then runs the pipeline three times
def test_demo_runs_offline_and_caches_its_trained_model(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)  # the demo writes logs/demo and saved_model_outputs under the working folder
    with caplog.at_level("INFO"):
        assert main.main([]) == 0
    assert "trained 15 epochs" in caplog.text
    with (tmp_path / "logs/demo/results.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [(row["ood_data"], row["detector"]) for row in rows] == \
        [(ood, det) for det in DETECTORS for ood in ("digits-5-9", "photo-patches", "uniform-noise")]
    assert float(rows[0]["id_acc"]) > 90  # the small CNN really learned digits 0-4
    nnguide = {row["ood_data"]: float(row["auroc"]) for row in rows if row["detector"] == "nnguide"}
    assert min(nnguide.values()) > 80
    assert len(list((tmp_path / "saved_model_outputs/small-cnn-digits").glob("trained-*.pt"))) == 1

    caplog.clear()
    first = (tmp_path / "logs/demo/results.csv").read_bytes()
    with caplog.at_level("INFO"):  # the same experiment (what `python main.py` runs), without redrawing its plots
        assert main.main(["--config", str(main.DEMO_EXPERIMENT), "--no-plots"]) == 0
    assert "trained 15 epochs" not in caplog.text and "extracting" not in caplog.text
    assert (tmp_path / "logs/demo/results.csv").read_bytes() == first

    caplog.clear()
    with caplog.at_level("INFO"):
        assert main.main(["--config", str(main.DEMO_EXPERIMENT), "--set", "detectors.nnguide.k=1,5,50",
                          "--output-dir", "sweep", "--no-plots"]) == 0
    assert "extracting" not in caplog.text  # a sweep re-uses every cached feature
    with (tmp_path / "sweep/sweep.csv").open() as file:
        sweep = list(csv.DictReader(file))
    assert [(row["detectors.nnguide.k"], row["detector"]) for row in sweep] == \
        [(k, "nnguide") for k in ("1", "5", "50") for _ in range(3)]
    k5 = {row["ood_data"]: row["auroc"] for row in sweep if row["detectors.nnguide.k"] == "5"}
    with (tmp_path / "sweep/detectors.nnguide.k=5/results.csv").open() as file:
        assert {row["ood_data"]: row["auroc"] for row in csv.DictReader(file)} == k5
