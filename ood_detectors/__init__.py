"""Post-hoc OOD detectors on a classifier's features and logits: NNGuide and the official baselines.

    det = create_detector("nnguide", k=10).fit(bank_outputs)
    scores = det.score_samples(test_outputs)      # (N,), higher = more in-distribution

`outputs` dicts hold torch tensors `feas` (N, D) L2-normalised features, `logits` (N, C), `labels` (N,).
This package imports nothing from the rest of the repository, so it works on any model's features.
"""
from ood_detectors.base import OODDetector, Outputs, available_detectors, create_detector, register_detector
from ood_detectors import confidence, knn, mahalanobis, nnguide, vim  # noqa: F401  (fill the registry)

__all__ = ["OODDetector", "Outputs", "available_detectors", "create_detector", "register_detector"]
