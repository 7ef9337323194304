"""Each detector against a brute-force numpy transcription of its official definition."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import logsumexp, softmax
from sklearn.exceptions import NotFittedError

from ood_detectors import available_detectors, create_detector

DIM, CLASSES = 24, 6


def make_outputs(n: int, seed: int, dim: int = DIM, classes: int = CLASSES) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    raw = rng.normal(size=(n, dim)).astype(np.float32) + rng.normal(size=dim).astype(np.float32)
    feas = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    weight = rng.normal(size=(dim, classes)).astype(np.float32)
    return {"feas": torch.from_numpy(feas),
            "logits": torch.from_numpy(raw @ weight),
            "labels": torch.from_numpy(rng.integers(0, classes, size=n))}


@pytest.fixture(scope="module")
def bank() -> dict[str, torch.Tensor]:
    return make_outputs(300, seed=0)


@pytest.fixture(scope="module")
def test_outputs() -> dict[str, torch.Tensor]:
    return make_outputs(80, seed=1)


def np_of(outputs):
    return {key: value.numpy().astype(np.float64) for key, value in outputs.items()}


def topk_inner_products(bank_feas: np.ndarray, query_feas: np.ndarray, k: int) -> np.ndarray:
    """(N, k) largest inner products, brute force, decreasing."""
    return -np.sort(-(query_feas @ bank_feas.T), axis=1)[:, :k]


def reference_scores(name: str, bank, test, **hp) -> np.ndarray:
    b, t = np_of(bank), np_of(test)
    energy = logsumexp(t["logits"], axis=1)
    if name == "energy":
        return energy
    if name == "msp":
        return softmax(t["logits"], axis=1).max(axis=1)
    if name == "maxlogit":
        return t["logits"].max(axis=1)
    if name == "kl":  # cross-entropy of softmax against uniform
        return -np.log(softmax(t["logits"], axis=1)).mean(axis=1)
    if name == "knn":
        return topk_inner_products(b["feas"], t["feas"], hp.get("k", 10))[:, -1]
    if name == "nnguide":
        scaled_bank = b["feas"] * logsumexp(b["logits"], axis=1)[:, None]
        return topk_inner_products(scaled_bank, t["feas"], hp.get("k", 10)).mean(axis=1) * energy
    if name == "vim":
        u = b["feas"].mean(axis=0)
        x = b["feas"] - u
        eigenvalues, eigenvectors = np.linalg.eigh(x.T @ x / len(x))
        residual = eigenvectors[:, np.argsort(eigenvalues)[::-1][hp["principal_dim"]:]]
        alpha = b["logits"].max(axis=1).mean() / np.linalg.norm(x @ residual, axis=1).mean()
        return energy - alpha * np.linalg.norm((t["feas"] - u) @ residual, axis=1)
    if name in ("mahalanobis", "ssd"):
        mean, std = b["feas"].mean(axis=0), b["feas"].std(axis=0) + 1e-8
        zb, zt = (b["feas"] - mean) / std, (t["feas"] - mean) / std
        groups = [bank["labels"].numpy() == c for c in np.unique(bank["labels"].numpy())] \
            if name == "mahalanobis" else [np.ones(len(zb), dtype=bool)]
        centres = [zb[g].mean(axis=0) for g in groups]
        covariance = np.mean([np.cov(zb[g], rowvar=False, bias=True) for g in groups], axis=0)
        precision = np.linalg.pinv(covariance)
        distances = np.stack([np.einsum("nd,de,ne->n", zt - c, precision, zt - c) for c in centres], axis=1)
        return -distances.min(axis=1)
    raise KeyError(name)


CASES = [("energy", {}), ("msp", {}), ("maxlogit", {}), ("kl", {}), ("knn", {"k": 10}), ("knn", {"k": 1}),
         ("nnguide", {"k": 10}), ("nnguide", {"k": 3}), ("vim", {"principal_dim": 10}),
         ("mahalanobis", {}), ("ssd", {})]


@pytest.mark.parametrize(("name", "hp"), CASES)
def test_scores_equal_the_official_definition(name, hp, bank, test_outputs):
    scores = create_detector(name, **hp).fit(bank).score_samples(test_outputs)
    assert isinstance(scores, torch.Tensor) and scores.shape == (80,)
    expected = reference_scores(name, bank, test_outputs, **hp)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())


def test_every_registered_detector_is_checked():
    assert {name for name, _ in CASES} == set(available_detectors())


@pytest.mark.parametrize("base", ["msp", "maxlogit"])
def test_nnguide_base_replaces_energy_in_both_places(base, bank, test_outputs):
    confidence = {"msp": lambda z: softmax(z, axis=1).max(axis=1), "maxlogit": lambda z: z.max(axis=1)}[base]
    b, t = np_of(bank), np_of(test_outputs)
    guidance = topk_inner_products(b["feas"] * confidence(b["logits"])[:, None], t["feas"], 10).mean(axis=1)
    scores = create_detector("nnguide", base=base).fit(bank).score_samples(test_outputs)
    np.testing.assert_allclose(scores.numpy(), guidance * confidence(t["logits"]), rtol=2e-4, atol=1e-6)


def test_nnguide_passes_base_options_to_its_base(bank, test_outputs):
    """nnguide on ViM with the ViM's own principal_dim: with confidence "raw", exactly that ViM's score."""
    vim = create_detector("vim", principal_dim=10).fit(bank)
    b = np_of(bank)
    bank_confidence = vim.score_samples(bank).numpy()
    guidance = topk_inner_products(b["feas"] * bank_confidence[:, None], np_of(test_outputs)["feas"], 10).mean(axis=1)
    scores = create_detector("nnguide", base="vim", base_options={"principal_dim": 10}, confidence="raw").fit(bank)
    expected = guidance * vim.score_samples(test_outputs).numpy()
    np.testing.assert_allclose(scores.score_samples(test_outputs).numpy(), expected, rtol=2e-4,
                               atol=2e-4 * np.abs(expected).max())


@pytest.mark.parametrize(("options", "values"), [
    ({"principal_dims": 10}, ["base_options", "'vim'", "'principal_dims'", "'principal_dim'"]),  # with the suggestion
    ({"principal_dim": 0}, ["base_options", "principal_dim", "got 0"]),
    ([10], ["base_options", "[10]"])])
def test_nnguide_rejects_bad_base_options_at_construction(options, values):
    with pytest.raises(ValueError) as error:
        create_detector("nnguide", base="vim", base_options=options)
    for value in values:
        assert value in str(error.value)


def test_knn_score_is_the_kth_nearest_neighbour_similarity():
    bank_feas = torch.eye(4)
    query = torch.tensor([[0.8, 0.6, 0.0, 0.0]])
    det = create_detector("knn", k=2).fit({"feas": bank_feas})
    assert det.score_samples({"feas": query}).item() == pytest.approx(0.6)


def test_mahalanobis_skips_classes_absent_from_the_bank(bank, test_outputs):
    sparse_labels = bank["labels"] * 3  # labels 0, 3, 6, ...: most class indices have no bank sample
    scores = create_detector("mahalanobis").fit({**bank, "labels": sparse_labels}).score_samples(test_outputs)
    assert torch.isfinite(scores).all()
    expected = reference_scores("mahalanobis", bank, test_outputs)  # same clusters, other names
    np.testing.assert_allclose(scores.numpy(), expected, rtol=2e-4, atol=1e-3)


def test_mahalanobis_stays_finite_on_a_tiny_bank(test_outputs):
    tiny = make_outputs(12, seed=5)
    scores = create_detector("mahalanobis").fit(tiny).score_samples(test_outputs)
    assert torch.isfinite(scores).all()


def test_scores_keep_the_input_dtype_device_and_order(bank, test_outputs):
    for name in available_detectors():
        det = create_detector(name, **({"principal_dim": 10} if name == "vim" else {})).fit(bank)
        full = det.score_samples(test_outputs)
        reversed_outputs = {key: value.flip(0) for key, value in test_outputs.items()}
        torch.testing.assert_close(det.score_samples(reversed_outputs), full.flip(0))
        assert full.dtype == torch.float32 and full.device == test_outputs["feas"].device


# ---- bad input ---------------------------------------------------------------------------------------

def test_scoring_before_fit_is_a_not_fitted_error(test_outputs):
    with pytest.raises(NotFittedError, match="not fitted"):
        create_detector("nnguide").score_samples(test_outputs)


def test_unknown_detector_and_hyper_parameter_list_the_valid_ones():
    with pytest.raises(ValueError) as error:
        create_detector("nnguid")
    assert "'nnguid'" in str(error.value) and "'nnguide'" in str(error.value)  # the name and the suggestion
    assert all(name in str(error.value) for name in available_detectors())
    with pytest.raises(ValueError) as error:
        create_detector("nnguide", kk=5)
    assert "'kk'" in str(error.value) and "'k'" in str(error.value)
    with pytest.raises(ValueError) as error:
        create_detector("nnguide", K=10)  # one letter's case is not a typo: difflib alone finds nothing
    assert "'K'" in str(error.value) and "'k'" in str(error.value)
    with pytest.raises(ValueError) as error:
        create_detector("NNGuid")
    assert "'NNGuid'" in str(error.value) and "'nnguide'" in str(error.value)


@pytest.mark.parametrize("k", [0, -3, 2.5, True])
def test_k_must_be_a_positive_integer(k):
    with pytest.raises(ValueError) as error:
        create_detector("knn", k=k)
    assert "knn: k" in str(error.value) and f"got {k}" in str(error.value)


def test_k_larger_than_the_bank_is_an_error(test_outputs):
    with pytest.raises(ValueError) as error:
        create_detector("nnguide", k=20).fit(make_outputs(12, seed=3))
    assert "k=20" in str(error.value) and "12 samples" in str(error.value)


def test_vim_principal_dim_must_be_below_the_feature_dimension(bank):
    with pytest.raises(ValueError) as error:
        create_detector("vim", principal_dim=DIM).fit(bank)
    assert f"principal_dim={DIM}" in str(error.value) and f"dimension {DIM}" in str(error.value)


def test_nnguide_rejects_an_unknown_base():
    with pytest.raises(ValueError) as error:
        create_detector("nnguide", base="softmax")
    assert all(value in str(error.value) for value in ("'softmax'", "energy", "vim"))  # the name, valid ones


@pytest.mark.parametrize("field", ["feas", "logits"])
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_inputs_name_the_field_and_row_count(field, bad_value, bank, test_outputs):
    corrupted = {key: value.clone() for key, value in test_outputs.items()}
    corrupted[field][[3, 7], 0] = bad_value
    det = create_detector("nnguide").fit(bank)
    with pytest.raises(ValueError) as error:
        det.score_samples(corrupted)
    assert f"'{field}'" in str(error.value) and "2 of 80" in str(error.value)
    with pytest.raises(ValueError) as error:
        create_detector("nnguide").fit(corrupted)
    assert f"'{field}'" in str(error.value) and "2 of 80" in str(error.value)


def test_dimension_mismatch_between_fit_and_score(bank):
    det = create_detector("knn").fit(bank)
    with pytest.raises(ValueError) as error:
        det.score_samples(make_outputs(5, seed=2, dim=12))
    assert all(value in str(error.value) for value in ("'feas'", "dimension 12", f"dimension {DIM}"))


def test_missing_field_empty_bank_and_length_mismatch(bank):
    with pytest.raises(ValueError) as error:
        create_detector("energy").fit({"feas": bank["feas"]})
    assert "'logits'" in str(error.value) and "feas" in str(error.value)  # the field missing, the one given
    with pytest.raises(ValueError) as error:
        create_detector("knn").fit({"feas": torch.empty(0, DIM)})
    assert "'feas'" in str(error.value) and f"(0, {DIM})" in str(error.value)
    with pytest.raises(ValueError) as error:
        create_detector("nnguide").fit({"feas": bank["feas"], "logits": bank["logits"][:10]})
    assert f"'feas': {len(bank['feas'])}" in str(error.value) and "'logits': 10" in str(error.value)
    with pytest.raises(ValueError) as error:
        create_detector("mahalanobis").fit({"feas": bank["feas"], "labels": bank["labels"].float()})
    assert "'labels'" in str(error.value) and "torch.float32" in str(error.value)


def test_covariance_algebra_matches_torch_on_a_rank_deficient_bank():
    """gram / eigh / symmetric_pinv (numpy on CPUs) against torch's own: a bank with a dead (all-zero) feature
    and a duplicated one has a covariance of rank D - 2, so the pseudo-inverse's cut-off is exercised."""
    from ood_detectors.linalg import eigh, gram, symmetric_pinv
    rows = torch.randn(200, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    rows[:, 0], rows[:, 1] = 0, rows[:, 2]
    covariance = gram(rows) / 200
    torch.testing.assert_close(covariance, rows.T @ rows / 200)
    values, vectors = eigh(covariance)
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.T, covariance)
    torch.testing.assert_close(values, torch.linalg.eigvalsh(covariance))
    precision = symmetric_pinv(covariance)
    torch.testing.assert_close(precision, torch.linalg.pinv(covariance, hermitian=True))
    assert torch.linalg.matrix_rank(precision) == 10
