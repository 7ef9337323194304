"""nnguide with ViM as its base (configs/detectors/nnguide-vim.yaml) and the `confidence` option, against numpy."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy.special import logsumexp

from ood_detectors import create_detector
from tests.test_detectors import make_outputs, np_of, reference_scores, topk_inner_products

PRINCIPAL_DIM = 10  # of the 24-d test features
N_QUERIES = 80  # and as many mirror images
NNGUIDE_VIM_YAML = Path(__file__).resolve().parents[1] / "configs" / "detectors" / "nnguide-vim.yaml"


@pytest.fixture(scope="module")
def split() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(bank, queries) drawn from one classifier, so ViM is negative for about half of each.

    The last N_QUERIES queries mirror the first ones (-z): they point away from the data, so flipped bank features
    -|C| z_i would be among their best matches; their logits are shifted to keep each mirrored query's ViM
    (a constant added to the logits adds to the energy and to ViM)."""
    outputs = make_outputs(300 + N_QUERIES, seed=0)
    bank = {key: value[:300] for key, value in outputs.items()}
    queries = {key: value[300:] for key, value in outputs.items() if key != "labels"}
    vim = create_detector("vim", principal_dim=PRINCIPAL_DIM).fit(bank)
    mirrored = {"feas": -queries["feas"], "logits": queries["logits"]}
    shift = vim.score_samples(queries) - vim.score_samples(mirrored)
    return bank, {"feas": torch.cat([queries["feas"], mirrored["feas"]]),
                  "logits": torch.cat([queries["logits"], mirrored["logits"] + shift[:, None]])}


def vim_of(bank, queries) -> np.ndarray:
    return reference_scores("vim", bank, queries, principal_dim=PRINCIPAL_DIM)


def nnguide_reference(bank, queries, bank_confidence: np.ndarray, query_confidence: np.ndarray,
                      k: int = 10) -> np.ndarray:
    """The paper's formula with any confidence: mean of the k largest <z, C(x_i) z_i>, times C(x)."""
    scaled_bank = np_of(bank)["feas"] * bank_confidence[:, None]
    return topk_inner_products(scaled_bank, np_of(queries)["feas"], k).mean(axis=1) * query_confidence


def assert_close(scores: torch.Tensor, expected: np.ndarray) -> None:
    np.testing.assert_allclose(scores.numpy(), expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())


def nnguide_vim_config() -> dict:
    """configs/detectors/nnguide-vim.yaml's hyper-parameters, with a principal space that fits 24-d features."""
    config = yaml.safe_load(NNGUIDE_VIM_YAML.read_text())
    assert config.pop("detector") == "nnguide"
    config["base_options"] = {**config["base_options"], "principal_dim": PRINCIPAL_DIM}
    return config


def test_nnguide_vim_scores_are_guidance_from_a_softplus_vim_bank_times_softplus_vim(split):
    bank, queries = split
    detector = create_detector("nnguide", **nnguide_vim_config()).fit(bank)
    bank_vim, query_vim = vim_of(bank, bank), vim_of(bank, queries)
    assert (bank_vim < 0).mean() > 0.3 and (query_vim < 0).mean() > 0.3  # the case the fix is for
    softplus = np.logaddexp(0.0, bank_vim), np.logaddexp(0.0, query_vim)
    expected = nnguide_reference(bank, queries, *softplus)
    assert_close(detector.score_samples(queries), expected)
    # the old reading, ViM itself in both places, is a different score on these inputs: flipped bank
    # features, and negative scores for the queries with ViM < 0
    old = nnguide_reference(bank, queries, bank_vim, query_vim)
    assert np.abs(expected - old).max() > 0.1 * np.abs(expected).max()
    assert (old[:N_QUERIES] < 0).any() and (expected[:N_QUERIES] > 0).all()


def test_guidance_still_rewards_closeness_when_vim_is_negative(split):
    """Two queries with the same negative ViM: the one on the data must score higher than the one far from it.

    With ViM itself as the confidence (the old nnguide-vim) a negative ViM times a larger guidance gives a lower
    score, so closeness to the data counted against the query."""
    bank, _ = split
    vim = create_detector("vim", principal_dim=PRINCIPAL_DIM).fit(bank)
    near_feas = bank["feas"][:1]                                    # a bank feature: on the data
    mean_direction = torch.nn.functional.normalize(bank["feas"].mean(dim=0, keepdim=True), dim=1)
    far_feas = torch.nn.functional.normalize(near_feas - (near_feas @ mean_direction.T) * mean_direction, dim=1)
    similarity = {name: topk_inner_products(np_of(bank)["feas"], feas.numpy(), 10).mean()
                  for name, feas in (("near", near_feas), ("far", far_feas))}
    assert similarity["near"] > 0.8 and 0 < similarity["far"] < 0.4  # farther from the data, not opposite to it
    logits = bank["logits"][:1]
    near, far = ({"feas": feas, "logits": logits - 3.0 - vim.score_samples({"feas": feas, "logits": logits})[:, None]}
                 for feas in (near_feas, far_feas))  # a constant added to the logits adds it to the energy and ViM
    np.testing.assert_allclose(torch.cat([vim.score_samples(near), vim.score_samples(far)]).numpy(), -3.0, atol=1e-4)

    chosen = create_detector("nnguide", **nnguide_vim_config()).fit(bank)
    assert chosen.score_samples(near).item() > chosen.score_samples(far).item()
    old = create_detector("nnguide", base="vim", base_options={"principal_dim": PRINCIPAL_DIM},
                          confidence="raw").fit(bank)
    assert old.score_samples(near).item() < old.score_samples(far).item()  # the inversion the fix removes


@pytest.mark.parametrize("confidence", ["raw", "softplus", "shift", "exp"])
@pytest.mark.parametrize("bank_confidence", ["base", "energy"])
def test_every_confidence_reading_equals_its_formula(confidence, bank_confidence, split):
    bank, queries = split
    bank_vim, query_vim = vim_of(bank, bank), vim_of(bank, queries)
    to_confidence = {"raw": lambda s: s,
                     "softplus": lambda s: np.logaddexp(0.0, s),
                     "shift": lambda s: np.maximum(s - bank_vim.min(), 0.0),
                     "exp": lambda s: np.exp(s - bank_vim.max())}[confidence]
    bank_scale = to_confidence(bank_vim) if bank_confidence == "base" else logsumexp(np_of(bank)["logits"], axis=1)
    expected = nnguide_reference(bank, queries, bank_scale, to_confidence(query_vim))
    detector = create_detector("nnguide", base="vim", base_options={"principal_dim": PRINCIPAL_DIM},
                               confidence=confidence, bank_confidence=bank_confidence).fit(bank)
    assert_close(detector.score_samples(queries), expected)


def test_plain_nnguide_is_the_paper_formula_and_unchanged_by_the_options(split):
    """Energy S = logsumexp(logits): mean of the k largest <z, S(x_i) z_i>, times S(x); "raw" is the default."""
    bank, queries = split
    energy = logsumexp(np_of(bank)["logits"], axis=1), logsumexp(np_of(queries)["logits"], axis=1)
    plain = create_detector("nnguide").fit(bank).score_samples(queries)
    assert_close(plain, nnguide_reference(bank, queries, *energy))
    for options in ({"confidence": "raw"}, {"bank_confidence": "energy"}):
        same = create_detector("nnguide", **options).fit(bank).score_samples(queries)
        assert torch.equal(same, plain), options


@pytest.mark.parametrize(("option", "value", "valid"), [
    ("confidence", "sigmoid", ["raw", "softplus", "shift", "exp"]),
    ("confidence", 1, ["raw", "softplus", "shift", "exp"]),
    ("bank_confidence", "vim", ["base", "energy"])])
def test_bad_option_values_name_the_value_and_the_valid_ones(option, value, valid):
    with pytest.raises(ValueError) as error:
        create_detector("nnguide", base="vim", **{option: value})
    for expected in ["nnguide", option, repr(value), *valid]:
        assert expected in str(error.value)


def test_the_default_confidence_is_softplus_for_vim_and_the_raw_score_for_the_others(split):
    bank, queries = split
    options = {"base": "vim", "base_options": {"principal_dim": PRINCIPAL_DIM}}
    assert create_detector("nnguide", **options).confidence == "softplus"
    assert create_detector("nnguide").confidence == "raw"
    default = create_detector("nnguide", **options).fit(bank).score_samples(queries)
    softplus = create_detector("nnguide", confidence="softplus", **options).fit(bank).score_samples(queries)
    assert torch.equal(default, softplus)
