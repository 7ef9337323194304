"""The official NNGuide repository's knn, nnguide, vim and ssd computations, restated for timing side by side.

What each call does follows roomo7time/nnguide (ood_detectors/assets.py, knn.py, nnguide.py, vim.py, ssd.py):
a faiss `IndexFlatIP` built from a copy of the bank at every scoring call; ViM's covariance by scikit-learn's
`EmpiricalCovariance` in float32 and a general (non-symmetric) `np.linalg.eig`; SSD by numpy in float64
(`np.cov`, an SVD pseudo-inverse). Only the timing is used here; the scores' equality with ours is
tests/test_detectors.py's job.
"""
from __future__ import annotations

import numpy as np
import torch


def _faiss_top_k(bank: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """(N, k) inner products, the way the official `knn_score` gets them: copies, a fresh flat index, search."""
    import faiss
    index = faiss.IndexFlatIP(bank.shape[1])
    index.add(np.array(bank, copy=True))
    similarities, _ = index.search(np.array(queries, copy=True), k)
    return similarities


class OfficialKNN:
    def __init__(self, k: int = 10) -> None:
        self.k = k

    def fit(self, bank: dict[str, torch.Tensor]) -> "OfficialKNN":
        self.feas = bank["feas"].numpy()
        return self

    def score_samples(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.from_numpy(_faiss_top_k(self.feas, outputs["feas"].numpy(), self.k).min(axis=1))


class OfficialNNGuide:
    def __init__(self, k: int = 10) -> None:
        self.k = k

    def fit(self, bank: dict[str, torch.Tensor]) -> "OfficialNNGuide":
        self.scaled_feas = (bank["feas"] * torch.logsumexp(bank["logits"], dim=1)[:, None]).numpy()
        return self

    def score_samples(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        guidance = _faiss_top_k(self.scaled_feas, outputs["feas"].numpy(), self.k).mean(axis=1)
        return torch.from_numpy(guidance) * torch.logsumexp(outputs["logits"], dim=1)


class OfficialViM:
    def __init__(self, principal_dim: int = 500) -> None:
        self.principal_dim = principal_dim

    def fit(self, bank: dict[str, torch.Tensor]) -> "OfficialViM":
        from sklearn.covariance import EmpiricalCovariance
        self.centre = bank["feas"].mean(dim=0, keepdim=True)
        centred = bank["feas"] - self.centre
        covariance = EmpiricalCovariance(assume_centered=True).fit(centred.numpy()).covariance_
        eigenvalues, eigenvectors = np.linalg.eig(covariance)
        residual = eigenvectors.T[np.argsort(-eigenvalues)[self.principal_dim:]].T
        self.residual = torch.from_numpy(np.ascontiguousarray(residual))
        self.alpha = bank["logits"].max(dim=1).values.mean() / (centred @ self.residual).norm(dim=1).mean()
        return self

    def score_samples(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        virtual_logit = ((outputs["feas"] - self.centre) @ self.residual).norm(dim=1) * self.alpha
        return torch.logsumexp(outputs["logits"], dim=1) - virtual_logit


class OfficialSSD:
    """The official `Mahalanobis(num_clusters=1)`: normalise, standardise, one centre, pinv of its covariance."""

    def fit(self, bank: dict[str, torch.Tensor]) -> "OfficialSSD":
        feas = bank["feas"].numpy()
        self.mean, self.std = feas.mean(axis=0, keepdims=True), feas.std(axis=0, keepdims=True)
        standardised = self._preprocess(feas)
        self.centre = standardised.mean(axis=0)
        self.precision = np.linalg.pinv(np.cov(standardised.T, bias=True))
        return self

    def _preprocess(self, feas: np.ndarray) -> np.ndarray:
        unit = feas / np.maximum(np.linalg.norm(feas, axis=1, keepdims=True), 1e-12)  # sklearn's normalize
        return (unit - self.mean) / (self.std + 1e-8)

    def score_samples(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self._preprocess(outputs["feas"].numpy())
        x_precision = np.matmul(x, self.precision)
        centre = self.centre[None, :]
        distance = ((x_precision * x).sum(axis=1)[:, None] + (centre @ self.precision * centre).sum(axis=1)[None, :]
                    - 2 * x_precision @ centre.T)
        return torch.from_numpy(np.exp(-(distance.min(axis=1) / 2048) / 2))


OFFICIAL = {"knn": OfficialKNN, "nnguide": OfficialNNGuide, "vim": OfficialViM, "ssd": OfficialSSD}
