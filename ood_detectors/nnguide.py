"""Nearest Neighbor Guidance (Park, Jung & Teoh, ICCV 2023): the paper's method."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ood_detectors.base import OODDetector, Outputs, check_positive_int, create_detector, register_detector
from ood_detectors.knn import check_k_fits_bank
from ood_detectors.search import InnerProductSearch, check_search_options

BASE_SCORES = ("energy", "msp", "maxlogit", "kl", "vim")


@register_detector("nnguide")
@dataclasses.dataclass(eq=False)
class NNGuide(OODDetector):
    """score(x) = guidance(x) * S(x), with S the classifier's confidence (energy by default) and

        guidance(x) = mean of the k largest <z, S(x_i) z_i> over the bank,

    z the L2-normalised features. Scaling each bank feature by its own confidence lets the score keep the
    classifier's fine-grained ranking near the data while the guidance shrinks its over-confidence far from it.
    `base` picks S: "energy" (the paper), "msp", "maxlogit", "kl", or "vim" (the paper's ViT variant);
    `base_options` are the base detector's own hyper-parameters (e.g. {"principal_dim": 500} for vim).
    """

    k: int = 10
    base: str = "energy"
    backend: str = "auto"  # nearest-neighbour search: "auto", "faiss" or "torch"
    bank_dtype: str = "float32"  # "float16": faster, half the memory, similarities rounded (see search.py)
    base_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    fit_fields = ("feas", "logits")
    score_fields = ("feas", "logits")

    def __post_init__(self) -> None:
        check_positive_int(self.k, "nnguide: k")
        check_search_options(self.backend, self.bank_dtype, "nnguide")
        if self.base not in BASE_SCORES:
            raise ValueError(f"nnguide: base must be one of {', '.join(BASE_SCORES)}, got {self.base!r}")
        if not isinstance(self.base_options, dict):
            raise ValueError(f"nnguide: base_options must be a mapping of the base's hyper-parameters, "
                             f"got {self.base_options!r}")
        try:  # unknown or invalid options fail now, not after extraction
            create_detector(self.base, **self.base_options)
        except ValueError as error:
            raise ValueError(f"nnguide: base_options: {error}") from None

    def _fit(self, outputs: Outputs) -> None:
        check_k_fits_bank(self.k, outputs["feas"].shape[0], "nnguide")
        self.base_ = create_detector(self.base, **self.base_options).fit(outputs)
        bank_confidence = self.base_.score_samples(outputs)                # (M,)
        scaled_bank = outputs["feas"] * bank_confidence[:, None]           # (M, D)
        self.index_ = InnerProductSearch(scaled_bank, backend=self.backend, bank_dtype=self.bank_dtype)

    def _score(self, outputs: Outputs) -> torch.Tensor:
        guidance = self.index_.search(outputs["feas"], self.k).mean(dim=1)  # (N,)
        return guidance * self.base_.score_samples(outputs)
