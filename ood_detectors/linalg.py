"""The float64 covariance algebra that ViM, Mahalanobis and SSD fit: a Gram matrix, its eigenvectors, a pseudo-inverse.

Symmetric routines throughout; numpy on a CPU (`x.T @ x` of one array is a symmetric rank-k product there),
torch on a GPU. Why: docs/design.md ("Linear algebra").
"""
from __future__ import annotations

import numpy as np
import torch


def gram(rows: torch.Tensor) -> torch.Tensor:
    """rows.T @ rows, (D, D), in rows' dtype and device."""
    if rows.device.type == "cpu":
        array = rows.detach().numpy()
        return torch.from_numpy(array.T @ array)
    return rows.T @ rows


def eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors (columns) of a symmetric matrix."""
    if matrix.device.type == "cpu":
        values, vectors = np.linalg.eigh(matrix.detach().numpy())
        return torch.from_numpy(values), torch.from_numpy(vectors)
    return torch.linalg.eigh(matrix)


def symmetric_pinv(matrix: torch.Tensor) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of a symmetric matrix, with torch.linalg.pinv(hermitian=True)'s cut-off:
    eigenvalues of magnitude at most size * eps * the largest are treated as zero."""
    values, vectors = eigh(matrix)
    kept = values.abs() > matrix.shape[0] * torch.finfo(values.dtype).eps * values.abs().max()
    vectors = vectors[:, kept]
    return (vectors / values[kept]) @ vectors.T
