"""Virtual-logit Matching (Wang et al., CVPR 2022), in the form the NNGuide repository uses."""
from __future__ import annotations

import dataclasses

import torch

from ood_detectors.base import OODDetector, Outputs, check_positive_int, register_detector
from ood_detectors.confidence import energy
from ood_detectors.linalg import eigh, gram


@register_detector("vim")
@dataclasses.dataclass(eq=False)
class ViM(OODDetector):
    """Virtual-logit Matching (Wang et al., CVPR 2022).

        score(x) = E(x) - alpha * ||(z - u) R||,

    E the energy, z the normalised features, u the bank's mean feature (the NNGuide repository's centre; see
    docs/differences.md), R the eigenvectors of the bank covariance beyond the top `principal_dim` (the residual
    space), and alpha = mean bank max-logit / mean bank residual norm.
    """

    principal_dim: int = 500

    fit_fields = ("feas", "logits")
    score_fields = ("feas", "logits")

    def __post_init__(self) -> None:
        check_positive_int(self.principal_dim, "vim: principal_dim")

    def check_feature_dim(self, dim: int) -> None:
        """ValueError unless principal_dim < dim: the residual space must exist."""
        if self.principal_dim >= dim:
            raise ValueError(f"vim: principal_dim={self.principal_dim} must be smaller than the feature "
                             f"dimension {dim}")

    def check_bank_size(self, bank_size: int) -> None:
        """ValueError unless the bank has at least principal_dim + 2 samples: centred, M samples span at most
        M - 1 directions, and the residual space needs bank variance beyond the top principal_dim."""
        if bank_size - 1 <= self.principal_dim:
            raise ValueError(f"vim: a bank of {bank_size} samples is too small for principal_dim="
                             f"{self.principal_dim}: centred, it spans at most {bank_size - 1} directions, so the "
                             f"residual space beyond the top {self.principal_dim} is arbitrary or empty of bank "
                             f"variance; use at least {self.principal_dim + 2} samples (a larger bank_ratio) or a "
                             f"principal_dim below {bank_size - 1}")

    def _fit(self, outputs: Outputs) -> None:
        feas = outputs["feas"].double()
        mean = feas.mean(dim=0)                                              # (D,)
        centred = feas - mean
        covariance = gram(centred) / feas.shape[0]                           # (D, D)
        eigenvalues, eigenvectors = eigh(covariance)                         # ascending eigenvalues
        order = torch.argsort(eigenvalues, descending=True)
        residual_space = eigenvectors[:, order[self.principal_dim:]]        # (D, D - principal_dim)
        residual_norm = torch.linalg.vector_norm(centred @ residual_space, dim=1)
        max_logit = outputs["logits"].double().amax(dim=1)
        self.alpha_ = (max_logit.mean() / residual_norm.mean()).item()
        # Fitted in float64 for an accurate eigenbasis; scoring in the inputs' precision is accurate enough.
        self.mean_ = mean.float()
        self.residual_space_ = residual_space.float().contiguous()

    def _score(self, outputs: Outputs) -> torch.Tensor:
        feas = outputs["feas"].float()
        centred = feas - self.mean_.to(feas.device)
        residual_norm = torch.linalg.vector_norm(centred @ self.residual_space_.to(feas.device), dim=1)
        return energy(outputs["logits"].float()) - self.alpha_ * residual_norm
