"""nnguide with ViM as its base (configs/detectors/nnguide-vim.yaml) against the bank confidence in the official
repository's early commits, restated in torch, and each `confidence` option against numpy."""
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
N_BELOW = 20  # queries whose ViM lies below the bank's minimum
NNGUIDE_VIM_YAML = Path(__file__).resolve().parents[1] / "configs" / "detectors" / "nnguide-vim.yaml"


@pytest.fixture(scope="module")
def split() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(bank, queries) drawn from one classifier, so ViM is negative for about half of each.

    The next N_QUERIES queries mirror the first ones (-z): they point away from the data, so flipped bank features
    -|C| z_i would be among their best matches; their logits are shifted to keep each mirrored query's ViM
    (a constant added to the logits adds to the energy and to ViM). The last N_BELOW queries are the first ones
    with their logits lowered so that their ViM lies 0.5 to 3 below the bank's minimum ViM."""
    outputs = make_outputs(300 + N_QUERIES, seed=0)
    bank = {key: value[:300] for key, value in outputs.items()}
    queries = {key: value[300:] for key, value in outputs.items() if key != "labels"}
    vim = create_detector("vim", principal_dim=PRINCIPAL_DIM).fit(bank)
    query_vim = vim.score_samples(queries)
    mirrored = {"feas": -queries["feas"], "logits": queries["logits"]}
    shift = query_vim - vim.score_samples(mirrored)
    below = vim.score_samples(bank).min() - torch.linspace(0.5, 3.0, N_BELOW)
    return bank, {"feas": torch.cat([queries["feas"], mirrored["feas"], queries["feas"][:N_BELOW]]),
                  "logits": torch.cat([queries["logits"], mirrored["logits"] + shift[:, None],
                                       queries["logits"][:N_BELOW] + (below - query_vim[:N_BELOW])[:, None]])}


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


def vim_fitted_as_in_the_early_official_code(bank, principal_dim: int):
    """ViM as roomo7time/nnguide f9bf6f2's ood_detectors/vim.py computes it, in torch (float64): u the mean bank
    feature, R the bank covariance's eigenvectors beyond the top principal_dim, the virtual logit
    alpha * ||(z - u) R|| with alpha = mean bank max-logit / mean bank ||(z - u) R||; S = logsumexp(logits) minus
    the virtual logit. Returns S as a function of {"feas", "logits"}."""
    feas, logits = bank["feas"].double(), bank["logits"].double()
    u = feas.mean(dim=0)
    centred = feas - u
    eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred / len(centred))
    residual_space = eigenvectors[:, eigenvalues.argsort(descending=True)[principal_dim:]]
    alpha = logits.amax(dim=1).mean() / (centred @ residual_space).norm(dim=1).mean()

    def vim(outputs):
        virtual_logits = alpha * ((outputs["feas"].double() - u) @ residual_space).norm(dim=1)
        return torch.logsumexp(outputs["logits"].double(), dim=1) - virtual_logits
    return vim


def guidance_times_confidence(bank_feas, bank_confidence, query_feas, query_confidence, k: int = 10):
    """mean of the k largest <z, C_i z_i> over the bank, times the query's C (torch, float64)."""
    similarities = query_feas.double() @ (bank_feas.double() * bank_confidence[:, None]).T  # (N, M)
    return similarities.topk(k, dim=1).values.mean(dim=1) * query_confidence


def test_nnguide_vim_is_the_bank_confidence_of_the_official_repository_history(split):
    """The shipped nnguide-vim against the recipe restated from roomo7time/nnguide f9bf6f2 (also 8bc104d, fc88ff3,
    484b5d9), ood_detectors/vim.py lines 37-42 of VIMOODDetector.setup, commented out there:
        bank confidence = energy - alpha * residual norm (ViM), minus its minimum over the bank (the lower bound);
    the test side (our reading): the test image's ViM minus that same stored lower bound, not floored at 0."""
    bank, queries = split
    vim = vim_fitted_as_in_the_early_official_code(bank, PRINCIPAL_DIM)
    bank_vim, query_vim = vim(bank), vim(queries)
    lower_bound = bank_vim.min()
    expected = guidance_times_confidence(bank["feas"], bank_vim - lower_bound, queries["feas"],
                                         query_vim - lower_bound).numpy()

    shipped = create_detector("nnguide", **nnguide_vim_config()).fit(bank).score_samples(queries)
    assert_close(shipped, expected)
    default = create_detector("nnguide", base="vim", base_options={"principal_dim": PRINCIPAL_DIM}).fit(bank)
    assert_close(default.score_samples(queries), expected)

    # the inputs tell the readings apart: ViM < 0 for much of the bank (ViM itself would flip those bank
    # features), and test images below the bank's minimum (a floor at 0, or a bound taken from the test set,
    # would change their scores)
    assert (bank_vim < 0).double().mean() > 0.3 and (query_vim < lower_bound).sum() >= N_BELOW
    shifted_bank = bank["feas"], bank_vim - lower_bound
    others = {"ViM in both places": guidance_times_confidence(bank["feas"], bank_vim, queries["feas"], query_vim),
              "test side floored at 0": guidance_times_confidence(*shifted_bank, queries["feas"],
                                                                  (query_vim - lower_bound).clamp_min(0)),
              "bound from the test set": guidance_times_confidence(*shifted_bank, queries["feas"],
                                                                   query_vim - query_vim.min())}
    for name, other in others.items():
        assert np.abs(other.numpy() - expected).max() > 0.01 * np.abs(expected).max(), name


def test_guidance_rewards_closeness_when_vim_is_negative_but_above_the_bank_minimum(split):
    """Two queries with the same negative ViM, above the bank's minimum: the one on the data must score higher
    than the one far from it.

    With ViM itself as the confidence (confidence="raw") a negative ViM times a larger guidance gives a lower
    score, so closeness to the data counts against the query. With bank_min_shift that happens only below the
    bank's minimum ViM, where C < 0."""
    bank, _ = split
    vim = create_detector("vim", principal_dim=PRINCIPAL_DIM).fit(bank)
    bank_minimum = vim.score_samples(bank).min().item()
    assert bank_minimum < -4.0
    near_feas = bank["feas"][:1]                                    # a bank feature: on the data
    mean_direction = torch.nn.functional.normalize(bank["feas"].mean(dim=0, keepdim=True), dim=1)
    far_feas = torch.nn.functional.normalize(near_feas - (near_feas @ mean_direction.T) * mean_direction, dim=1)
    similarity = {name: topk_inner_products(np_of(bank)["feas"], feas.numpy(), 10).mean()
                  for name, feas in (("near", near_feas), ("far", far_feas))}
    assert similarity["near"] > 0.8 and 0 < similarity["far"] < 0.4  # farther from the data, not opposite to it
    logits = bank["logits"][:1]

    def with_vim(feas: torch.Tensor, target: float) -> dict[str, torch.Tensor]:
        """feas with logits shifted so that ViM = target (a constant added to the logits adds to the energy)."""
        return {"feas": feas, "logits": logits + target - vim.score_samples({"feas": feas, "logits": logits})[:, None]}

    shipped = create_detector("nnguide", **nnguide_vim_config()).fit(bank)
    raw = create_detector("nnguide", base="vim", base_options={"principal_dim": PRINCIPAL_DIM},
                          confidence="raw").fit(bank)
    near, far = with_vim(near_feas, -3.0), with_vim(far_feas, -3.0)
    np.testing.assert_allclose(torch.cat([vim.score_samples(near), vim.score_samples(far)]).numpy(), -3.0, atol=1e-4)
    assert shipped.score_samples(near).item() > shipped.score_samples(far).item()
    assert raw.score_samples(near).item() < raw.score_samples(far).item()  # the inversion

    near, far = with_vim(near_feas, bank_minimum - 1.0), with_vim(far_feas, bank_minimum - 1.0)
    assert shipped.score_samples(near).item() < shipped.score_samples(far).item() < 0  # C < 0: not floored


@pytest.mark.parametrize("confidence", ["raw", "bank_min_shift", "softplus", "shift", "exp"])
@pytest.mark.parametrize("bank_confidence", ["base", "energy"])
def test_every_confidence_reading_equals_its_formula(confidence, bank_confidence, split):
    bank, queries = split
    bank_vim, query_vim = vim_of(bank, bank), vim_of(bank, queries)
    to_confidence = {"raw": lambda s: s,
                     "bank_min_shift": lambda s: s - bank_vim.min(),
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
    ("confidence", "sigmoid", ["raw", "bank_min_shift", "softplus", "shift", "exp"]),
    ("confidence", 1, ["raw", "bank_min_shift", "softplus", "shift", "exp"]),
    ("bank_confidence", "vim", ["base", "energy"])])
def test_bad_option_values_name_the_value_and_the_valid_ones(option, value, valid):
    with pytest.raises(ValueError) as error:
        create_detector("nnguide", base="vim", **{option: value})
    for expected in ["nnguide", option, repr(value), *valid]:
        assert expected in str(error.value)


def test_the_default_confidence_is_bank_min_shift_for_vim_and_the_raw_score_for_the_others(split):
    bank, queries = split
    options = {"base": "vim", "base_options": {"principal_dim": PRINCIPAL_DIM}}
    assert create_detector("nnguide", **options).confidence == "bank_min_shift"
    assert create_detector("nnguide").confidence == "raw"
    assert nnguide_vim_config()["confidence"] == "bank_min_shift"
    default = create_detector("nnguide", **options).fit(bank).score_samples(queries)
    explicit = create_detector("nnguide", confidence="bank_min_shift", **options).fit(bank).score_samples(queries)
    assert torch.equal(default, explicit)
