"""Mahalanobis distance to class centres (Lee et al., 2018) and its label-free variant SSD (Sehwag et al., 2021)."""
from __future__ import annotations

import dataclasses

import torch

from ood_detectors.base import OODDetector, Outputs, register_detector
from ood_detectors.linalg import gram, symmetric_pinv


class _GaussianDistance(OODDetector):
    """score(x) = -min_c (x' - mu_c)^T P (x' - mu_c), with x' the bank-standardised normalised feature, mu_c the
    cluster centres and P the pseudo-inverse of their shared covariance; computed in float64.

    The official code returns exp(-(d / 2048) / 2), the same ranking (see docs/differences.md).
    """

    def _standardise(self, feas: torch.Tensor) -> torch.Tensor:
        return (feas.double() - self.mean_.to(feas.device)) / self.std_.to(feas.device)

    def _fit_clusters(self, feas: torch.Tensor, assignment: torch.Tensor) -> None:
        """Centres and the shared precision; `assignment` gives each bank row's cluster in 0..C-1."""
        feas = feas.double()
        self.mean_ = feas.mean(dim=0)
        self.std_ = feas.std(dim=0, correction=0) + 1e-8
        standardised = self._standardise(feas)                                # (M, D)
        num_clusters = int(assignment.max()) + 1
        counts = torch.bincount(assignment, minlength=num_clusters).to(feas.dtype)
        sums = feas.new_zeros(num_clusters, feas.shape[1]).index_add_(0, assignment, standardised)
        self.centres_ = sums / counts[:, None]                                # (C, D)
        # mean over clusters of each one's biased covariance, as a single weighted product
        weighted = (standardised - self.centres_[assignment]) / counts[assignment].sqrt()[:, None]
        covariance = gram(weighted) / num_clusters                            # (D, D)
        self.precision_ = symmetric_pinv(covariance)

    def _score(self, outputs: Outputs) -> torch.Tensor:
        feas = outputs["feas"]
        precision = self.precision_.to(feas.device)
        centres = self.centres_.to(feas.device)
        centre_terms = ((centres @ precision) * centres).sum(dim=1)            # (C,) mu^T P mu
        scores = []
        for chunk in feas.split(8192):
            x = self._standardise(chunk)                                       # (n, D)
            x_precision = x @ precision
            # (x - mu)^T P (x - mu) = x^T P x - 2 x^T P mu + mu^T P mu, for all centres at once
            distances = ((x_precision * x).sum(dim=1, keepdim=True) - 2 * x_precision @ centres.T
                         + centre_terms)                                       # (n, C)
            scores.append(-distances.amin(dim=1))
        return torch.cat(scores).to(feas.dtype)


@register_detector("mahalanobis")
@dataclasses.dataclass(eq=False)
class Mahalanobis(_GaussianDistance):
    """Mahalanobis (Lee et al., NeurIPS 2018): one centre per class present in the bank labels, a covariance
    shared by all classes. Reads `feas` and, at fit, `labels`."""

    fit_fields = ("feas", "labels")
    score_fields = ("feas",)

    def _fit(self, outputs: Outputs) -> None:
        _, assignment = torch.unique(outputs["labels"], return_inverse=True)  # absent classes get no cluster
        self._fit_clusters(outputs["feas"], assignment)


@register_detector("ssd")
@dataclasses.dataclass(eq=False)
class SSD(_GaussianDistance):
    """SSD (Sehwag et al., ICLR 2021): a single cluster, the bank's own centre and covariance; no labels."""

    fit_fields = ("feas",)
    score_fields = ("feas",)

    def _fit(self, outputs: Outputs) -> None:
        self._fit_clusters(outputs["feas"], torch.zeros(outputs["feas"].shape[0], dtype=torch.long,
                                                          device=outputs["feas"].device))
