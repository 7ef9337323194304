"""benchmarks/latency.py at tiny sizes: the table it prints and the forward it times (no timing is asserted)."""
from __future__ import annotations

import pytest
import torch

from benchmarks import latency
from pipeline.config.loading import load_model_config

TINY = ["--device", "cpu", "--models", "small-cnn-digits", "--bank-size", "40", "--batch-size", "4",
        "--repeats", "2", "--batch-repeats", "1", "--warmup", "0"]


def table_rows(printed: str) -> list[list[str]]:
    lines = [line for line in printed.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]  # without the header


def test_one_row_per_detector_with_a_share_between_0_and_100(capsys):
    assert latency.main([*TINY, "--detectors", "nnguide", "knn", "energy"]) == 0
    printed = capsys.readouterr().out
    assert "random weights" in printed and "synthetic bank of 40 rows" in printed
    rows = table_rows(printed)
    assert [(row[0], row[1]) for row in rows] == [("small-cnn-digits", "nnguide"), ("small-cnn-digits", "knn"),
                                                  ("small-cnn-digits", "energy")]
    for row in rows:
        forward_ms, detector_ms, total_ms, images_per_s = (float(row[i]) for i in (2, 3, 4, 6))
        assert min(forward_ms, detector_ms, total_ms, images_per_s) > 0
        for share in (row[5], row[7]):
            assert 0 <= float(share.rstrip("%")) <= 100


def test_forward_clips_like_react_before_the_classifier():
    """The timed forward must hold the ReAct clip as real use does: logits of the clipped features."""
    config = load_model_config("small-cnn-digits")
    backbone = latency.build_random_backbone(config)
    images = torch.randn(3, 3, config.transform.crop, config.transform.crop)
    with torch.inference_mode():
        raw = backbone.features(images)
        clip = float(raw.median())
        outputs = latency.forward_outputs(backbone, images, clip)
        expected = backbone.classifier(raw.clip(max=clip))
        unclipped = backbone.classifier(raw)
    torch.testing.assert_close(outputs["logits"], expected)
    torch.testing.assert_close(outputs["feas"].norm(dim=1), torch.ones(3))
    assert not torch.allclose(outputs["logits"], unclipped)


def test_a_detector_that_does_not_fit_the_model_is_a_clear_error(capsys):
    # ViM keeps 500 principal dimensions; the small CNN has 128-d features
    assert latency.main([*TINY, "--bank-size", "600", "--detectors", "nnguide-vim"]) == 2
    assert "principal_dim=500" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--models", "--detectors"])
def test_unknown_names_fail_before_any_model_is_built(capsys, flag):
    assert latency.main([*TINY, flag, "no-such-name"]) == 2
    assert "no-such-name" in capsys.readouterr().err
