"""Classifier-confidence scores computed from the logits alone (no fitting needed)."""
from __future__ import annotations

import dataclasses

import torch

from ood_detectors.base import OODDetector, Outputs, register_detector


def energy(logits: torch.Tensor) -> torch.Tensor:
    """E(x) = logsumexp of the logits (Liu et al., 2020), the negative free energy at temperature 1."""
    return torch.logsumexp(logits, dim=1)


def max_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Maximum softmax probability (Hendrycks & Gimpel, 2017)."""
    return torch.softmax(logits, dim=1).amax(dim=1)


def max_logit(logits: torch.Tensor) -> torch.Tensor:
    """Largest logit (Hendrycks et al., 2022)."""
    return logits.amax(dim=1)


def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of softmax(logits) against the uniform distribution: -mean_c log p_c = E(x) - mean(logits)."""
    return energy(logits) - logits.mean(dim=1)


@register_detector("energy")
@dataclasses.dataclass(eq=False)
class Energy(OODDetector):
    """Energy score (Liu et al., NeurIPS 2020): logsumexp(logits)."""

    def _score(self, outputs: Outputs) -> torch.Tensor:
        return energy(outputs["logits"])


@register_detector("msp")
@dataclasses.dataclass(eq=False)
class MaxSoftmax(OODDetector):
    """Maximum softmax probability (Hendrycks & Gimpel, ICLR 2017): max_c softmax(logits)_c."""

    def _score(self, outputs: Outputs) -> torch.Tensor:
        return max_softmax(outputs["logits"])


@register_detector("maxlogit")
@dataclasses.dataclass(eq=False)
class MaxLogit(OODDetector):
    """Maximum logit (Hendrycks et al., ICML 2022): max_c logits_c."""

    def _score(self, outputs: Outputs) -> torch.Tensor:
        return max_logit(outputs["logits"])


@register_detector("kl")
@dataclasses.dataclass(eq=False)
class KLToUniform(OODDetector):
    """KL matching (Hendrycks et al., ICML 2022) in the official code's form: cross-entropy of the softmax
    against the uniform distribution, E(x) - mean(logits)."""

    def _score(self, outputs: Outputs) -> torch.Tensor:
        return kl_to_uniform(outputs["logits"])
