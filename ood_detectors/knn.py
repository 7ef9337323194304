"""Deep nearest neighbours (Sun et al., ICML 2022)."""
from __future__ import annotations

import dataclasses

import torch

from ood_detectors.base import OODDetector, Outputs, check_positive_int, register_detector
from ood_detectors.search import InnerProductSearch, check_search_options


@register_detector("knn")
@dataclasses.dataclass(eq=False)
class KNN(OODDetector):
    """Deep nearest neighbours (Sun et al., ICML 2022).

        score(x) = the k-th largest inner product <z, z_i> over the bank's normalised features z_i.

    For unit vectors this is 1 - d^2/2 of the k-th nearest neighbour (the official "min of the top-k
    similarities").
    """

    k: int = 10
    backend: str = "auto"  # nearest-neighbour search: "auto", "faiss", "torch" or "numpy" (see search.py)
    bank_dtype: str = "float32"  # "float16": half the memory, similarities to about 3 digits (see search.py)
    precision: str = "auto"  # "fp32", "bf16" (bf16 candidates, the fp32 neighbours) or "auto" (see search.py)

    fit_fields = ("feas",)
    score_fields = ("feas",)

    def __post_init__(self) -> None:
        check_positive_int(self.k, "knn: k")
        check_search_options(self.backend, self.bank_dtype, self.precision, "knn")

    def check_bank_size(self, bank_size: int) -> None:
        """The k-th neighbour must exist in the bank."""
        check_k_fits_bank(self.k, bank_size, "knn")

    def _fit(self, outputs: Outputs) -> None:
        self.index_ = InnerProductSearch(outputs["feas"], backend=self.backend, bank_dtype=self.bank_dtype,
                                         precision=self.precision)

    def _score(self, outputs: Outputs) -> torch.Tensor:
        return self.index_.search(outputs["feas"], self.k)[:, -1]


def check_k_fits_bank(k: int, bank_size: int, detector: str) -> None:
    """ValueError when k exceeds the bank size."""
    if k > bank_size:
        raise ValueError(f"{detector}: k={k} is larger than the bank ({bank_size} samples)")
