"""Hostile detector inputs: unnormalised or all-zero `feas`, a ViM bank too small for principal_dim, and the
checks a pipeline can run before extraction (check_feature_dim, check_bank_size)."""
from __future__ import annotations

import pytest
import torch

from ood_detectors import available_detectors, create_detector
from ood_detectors.base import OODDetector

DIM, CLASSES, BANK, QUERIES = 8, 3, 60, 20
PRINCIPAL_DIM = 4
SMALL = {"vim": {"principal_dim": PRINCIPAL_DIM}, "knn": {"k": 5}, "nnguide": {"k": 5}}  # fit the tiny bank
NNGUIDE_VIM = {"base": "vim", "base_options": {"principal_dim": PRINCIPAL_DIM}}


def detector(name: str, **hyper_parameters) -> OODDetector:
    return create_detector(name, **{**SMALL.get(name, {}), **hyper_parameters})


def reads_feas(name: str) -> bool:
    det = detector(name)
    return "feas" in det.fit_fields or "feas" in det.score_fields


FEAS_DETECTORS = [name for name in available_detectors() if reads_feas(name)]
LOGIT_DETECTORS = [name for name in available_detectors() if not reads_feas(name)]


def outputs(n: int, seed: int, dtype: torch.dtype = torch.float32, dim: int = DIM) -> dict[str, torch.Tensor]:
    """ReLU-like features normalised in `dtype` (as a user with half-precision features would), their logits."""
    generator = torch.Generator().manual_seed(seed)
    raw = torch.relu(torch.randn(n, dim, generator=generator) + 0.5) + 0.01  # no all-zero row
    logits = raw @ torch.randn(dim, CLASSES, generator=generator)
    return {"feas": torch.nn.functional.normalize(raw.to(dtype), dim=1), "logits": logits,
            "labels": torch.arange(n) % CLASSES}


def unnormalised_values(where: str, bad_rows: int, rows: int, low: str, high: str) -> list[str]:
    """What the error for unnormalised `feas` names: where, the field, the tolerance, how many rows are off, the
    range of their norms, and the fix."""
    return [f"{where}:", "'feas'", "1.0e-03", f"{bad_rows} of {rows} rows", f"{low} to {high}",
            "torch.nn.functional.normalize(feas, dim=1)"]


def test_the_registry_has_the_detectors_that_read_feas():
    assert {"knn", "nnguide", "vim", "mahalanobis", "ssd"} <= set(FEAS_DETECTORS)
    assert "energy" in LOGIT_DETECTORS


# ---- unnormalised and all-zero feas ----------------------------------------------------------------------

@pytest.mark.parametrize("name", FEAS_DETECTORS)
def test_unnormalised_bank_is_rejected_at_fit(name):
    bank = outputs(BANK, seed=0)
    scaled = {**bank, "feas": bank["feas"] * torch.linspace(2, 5, BANK)[:, None]}  # raw features' norms
    with pytest.raises(ValueError) as error:
        detector(name).fit(scaled)
    for value in unnormalised_values(f"{name}.fit", BANK, BANK, "2", "5"):
        assert value in str(error.value)


@pytest.mark.parametrize("name", FEAS_DETECTORS)
def test_unnormalised_queries_are_rejected_at_score(name):
    det = detector(name).fit(outputs(BANK, seed=0))
    queries = outputs(QUERIES, seed=1)
    queries["feas"][[2, 7]] *= 0.5  # two rows off: features that were rescaled after normalising
    with pytest.raises(ValueError) as error:
        det.score_samples(queries)
    for value in unnormalised_values(f"{name}.score_samples", 2, QUERIES, "0.5", "1"):
        assert value in str(error.value)


def test_nnguide_with_vim_base_rejects_unnormalised_feas():
    det = create_detector("nnguide", k=5, **NNGUIDE_VIM)
    bank = outputs(BANK, seed=0)
    with pytest.raises(ValueError) as error:
        det.fit({**bank, "feas": 3 * bank["feas"]})
    for value in unnormalised_values("nnguide.fit", BANK, BANK, "3", "3"):
        assert value in str(error.value)


@pytest.mark.parametrize("name", LOGIT_DETECTORS)
def test_detectors_that_ignore_feas_do_not_check_them(name):
    bank = outputs(BANK, seed=0)
    unnormalised = {**bank, "feas": 7 * bank["feas"]}
    scores = detector(name).fit(unnormalised).score_samples(unnormalised)
    assert torch.isfinite(scores).all()


def test_all_zero_rows_are_rejected_and_counted():
    det = detector("knn").fit(outputs(BANK, seed=0))
    queries = outputs(QUERIES, seed=1)
    queries["feas"][[0, 4, 9]] = 0  # what normalize() returns for a zero feature
    with pytest.raises(ValueError) as error:
        det.score_samples(queries)
    for value in (f"3 of {QUERIES} rows", "0 to 1", "3 of them", "all zero"):  # off, their norms, how many are zero
        assert value in str(error.value)


@pytest.mark.parametrize("name", FEAS_DETECTORS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_features_normalised_in_any_float_dtype_are_accepted(name, dtype):
    scores = detector(name).fit(outputs(BANK, seed=0, dtype=dtype)).score_samples(outputs(QUERIES, 1, dtype))
    assert scores.shape == (QUERIES,) and torch.isfinite(scores).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_rounding_stays_within_the_tolerance(dtype):
    """2-d features are the worst case (both components of a unit vector rounded the same way move its norm most);
    normalised in bfloat16 their norms stray beyond 1e-3, hence the dtype's own tolerance."""
    many = outputs(20_000, seed=2, dtype=dtype, dim=2)
    if dtype == torch.bfloat16:
        assert (torch.linalg.vector_norm(many["feas"].float(), dim=1) - 1).abs().max() > 1e-3
    detector("knn").fit(many)


def test_float32_tolerance_is_1e_3():
    bank = outputs(BANK, seed=0)
    detector("knn").fit({"feas": bank["feas"] * (1 + 0.9e-3)})
    with pytest.raises(ValueError, match=r"1\.0e-03"):
        detector("knn").fit({"feas": bank["feas"] * (1 + 1.1e-3)})


# ---- ViM's bank size and the pre-extraction checks ------------------------------------------------------

VIM_LIKE = [("vim", {}), ("nnguide", {"k": 2, **NNGUIDE_VIM})]


@pytest.mark.parametrize(("name", "hyper_parameters"), VIM_LIKE)
@pytest.mark.parametrize("bank_size", [PRINCIPAL_DIM, PRINCIPAL_DIM + 1])
def test_vim_rejects_a_bank_spanning_no_more_than_principal_dim(name, hyper_parameters, bank_size):
    """Centred, M samples span M - 1 directions: M - 1 <= principal_dim leaves no residual space to measure."""
    det = detector(name, **hyper_parameters)
    values = (f"{bank_size} samples", f"principal_dim={PRINCIPAL_DIM}", f"{bank_size - 1} directions",
              f"{PRINCIPAL_DIM + 2} samples", "bank_ratio", f"below {bank_size - 1}")  # the sizes and both fixes
    with pytest.raises(ValueError) as at_fit:
        det.fit(outputs(bank_size, seed=0))
    with pytest.raises(ValueError) as before_extraction:
        det.check_bank_size(bank_size)
    for value in values:
        assert value in str(at_fit.value) and value in str(before_extraction.value)


@pytest.mark.parametrize(("name", "hyper_parameters"), VIM_LIKE)
def test_vim_accepts_a_bank_just_large_enough(name, hyper_parameters):
    det = detector(name, **hyper_parameters)
    det.check_bank_size(PRINCIPAL_DIM + 2)
    scores = det.fit(outputs(PRINCIPAL_DIM + 2, seed=0)).score_samples(outputs(QUERIES, seed=1))
    assert torch.isfinite(scores).all() and scores.abs().max() < 1e6  # alpha is not a ratio to rounding noise


@pytest.mark.parametrize(("name", "hyper_parameters"), VIM_LIKE)
def test_check_feature_dim_raises_what_fit_raises(name, hyper_parameters):
    det = detector(name, **hyper_parameters)
    with pytest.raises(ValueError) as before_extraction:
        det.check_feature_dim(PRINCIPAL_DIM)
    with pytest.raises(ValueError) as at_fit:
        det.fit(outputs(BANK, seed=0, dim=PRINCIPAL_DIM))
    assert str(before_extraction.value) == str(at_fit.value)
    assert f"principal_dim={PRINCIPAL_DIM}" in str(at_fit.value) and f"dimension {PRINCIPAL_DIM}" in str(at_fit.value)
    det.check_feature_dim(PRINCIPAL_DIM + 1)


@pytest.mark.parametrize("name", [name for name in available_detectors() if name != "vim"])
def test_check_feature_dim_is_a_no_op_without_principal_dim(name):
    detector(name).check_feature_dim(1)


def test_check_bank_size_checks_k_for_the_neighbour_detectors():
    for name in ("knn", "nnguide"):
        with pytest.raises(ValueError) as error:
            detector(name).check_bank_size(4)
        assert all(value in str(error.value) for value in (f"{name}:", "k=5", "4 samples"))
        detector(name).check_bank_size(5)
    for name in ("energy", "mahalanobis", "ssd"):
        detector(name).check_bank_size(1)
