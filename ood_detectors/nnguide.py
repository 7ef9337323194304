"""Nearest Neighbor Guidance (Park, Jung & Teoh, ICCV 2023): the paper's method."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ood_detectors.base import OODDetector, Outputs, check_positive_int, create_detector, register_detector
from ood_detectors.confidence import energy
from ood_detectors.knn import check_k_fits_bank
from ood_detectors.search import InnerProductSearch, check_search_options

BASE_SCORES = ("energy", "msp", "maxlogit", "kl", "vim")
CONFIDENCES = ("raw", "bank_min_shift", "softplus", "shift", "exp")  # how the base score S becomes the confidence C
BANK_CONFIDENCES = ("base", "energy")  # what scales the bank: C, or the energy as in plain NNGuide


def to_confidence(scores: torch.Tensor, kind: str, offset: float) -> torch.Tensor:
    """The confidence C (N,) from base scores S (N,), increasing in S: "raw" S; "bank_min_shift" S - offset;
    "softplus" log(1 + e^S); "shift" max(S - offset, 0); "exp" e^(S - offset). `offset` is the bank's minimum
    S for "bank_min_shift" and "shift", its maximum for "exp", so C >= 0 on the bank for all but "raw"."""
    if kind == "raw":
        return scores
    if kind == "bank_min_shift":
        return scores - offset
    if kind == "softplus":
        return torch.nn.functional.softplus(scores)
    if kind == "shift":
        return (scores - offset).clamp_min(0)
    return torch.exp(scores - offset)


@register_detector("nnguide")
@dataclasses.dataclass(eq=False)
class NNGuide(OODDetector):
    """Nearest Neighbor Guidance (Park, Jung & Teoh, ICCV 2023).

        score(x) = guidance(x) * C(x),   guidance(x) = mean of the k largest <z, C(x_i) z_i> over the bank,

    z the L2-normalised features and C the classifier's confidence, computed from a base score S. The guidance
    keeps the classifier's ranking near the data and shrinks its over-confidence far from it.
    `base` picks S: "energy" (the paper), "msp", "maxlogit", "kl" or "vim" (the paper's ViT-B/16 row,
    "NNGuide-ViM"); `base_options` are the base's own hyper-parameters (e.g. principal_dim).
    `confidence` maps S to C (see `to_confidence`): "raw", C = S, the paper's formula and the default for the
    logit scores; "bank_min_shift", C = S - min of S over the bank, the default for "vim", whose S is negative
    for much of a bank; "softplus"; "shift"; "exp".
    `bank_confidence="energy"` scales the bank by the energy whatever the base. The NNGuide-ViM reading and its
    alternatives: docs/differences.md ("NNGuide-ViM").
    """

    k: int = 10
    base: str = "energy"
    backend: str = "auto"  # nearest-neighbour search: "auto", "faiss", "torch" or "numpy" (see search.py)
    bank_dtype: str = "float32"  # "float16": half the memory, similarities to about 3 digits (see search.py)
    precision: str = "auto"  # "fp32", "bf16" (bf16 candidates, the fp32 neighbours) or "auto" (see search.py)
    base_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    confidence: str | None = None  # C from S (see CONFIDENCES); None: bank_min_shift for vim, else raw
    bank_confidence: str = "base"  # what scales the bank features: "base" (C) or "energy"

    fit_fields = ("feas", "logits")
    score_fields = ("feas", "logits")

    def __post_init__(self) -> None:
        check_positive_int(self.k, "nnguide: k")
        check_search_options(self.backend, self.bank_dtype, self.precision, "nnguide")
        if self.base not in BASE_SCORES:
            raise ValueError(f"nnguide: base must be one of {', '.join(BASE_SCORES)}, got {self.base!r}")
        if self.confidence is None:
            self.confidence = "bank_min_shift" if self.base == "vim" else "raw"
        if self.confidence not in CONFIDENCES:
            raise ValueError(f"nnguide: confidence must be one of {', '.join(CONFIDENCES)}, "
                             f"got {self.confidence!r}")
        if self.bank_confidence not in BANK_CONFIDENCES:
            raise ValueError(f"nnguide: bank_confidence must be one of {', '.join(BANK_CONFIDENCES)}, "
                             f"got {self.bank_confidence!r}")
        if not isinstance(self.base_options, dict):
            raise ValueError(f"nnguide: base_options must be a mapping of the base's hyper-parameters, "
                             f"got {self.base_options!r}")
        try:  # unknown or invalid options fail now, not after extraction
            self._new_base()
        except ValueError as error:
            raise ValueError(f"nnguide: base_options: {error}") from None

    def _new_base(self) -> OODDetector:
        """An unfitted base-score detector with base_options."""
        return create_detector(self.base, **self.base_options)

    def check_feature_dim(self, dim: int) -> None:
        """The base's own limits (ViM's principal_dim); the guidance works at any width."""
        self._new_base().check_feature_dim(dim)

    def check_bank_size(self, bank_size: int) -> None:
        """k must fit the bank, and the base (ViM) is fitted on the same bank."""
        check_k_fits_bank(self.k, bank_size, "nnguide")
        self._new_base().check_bank_size(bank_size)

    def _fit(self, outputs: Outputs) -> None:
        self.base_ = self._new_base().fit(outputs)
        bank_scores = self.base_.score_samples(outputs)                    # (M,)
        # the bank's extreme that C subtracts, kept for the queries; 0 (unused) for "raw" and "softplus"
        offsets = {"bank_min_shift": bank_scores.min(), "shift": bank_scores.min(), "exp": bank_scores.max()}
        self.offset_ = offsets[self.confidence].item() if self.confidence in offsets else 0.0
        bank_confidence = (energy(outputs["logits"]) if self.bank_confidence == "energy"
                           else to_confidence(bank_scores, self.confidence, self.offset_))  # (M,)
        scaled_bank = outputs["feas"] * bank_confidence[:, None]           # (M, D)
        self.index_ = InnerProductSearch(scaled_bank, backend=self.backend, bank_dtype=self.bank_dtype,
                                         precision=self.precision)

    def _score(self, outputs: Outputs) -> torch.Tensor:
        guidance = self.index_.search(outputs["feas"], self.k).mean(dim=1)  # (N,)
        return guidance * to_confidence(self.base_.score_samples(outputs), self.confidence, self.offset_)
