"""Backbone registry: architectures, safe checkpoint loading, ReAct; a Backbone's forward gives (features, logits)."""
from models.base import (ARCHITECTURES, Backbone, ModelConfig, TrainingRecipe, TransformConfig, build_backbone,
                         file_sha256, resolve_checkpoint)
from models.react import apply_react, react_threshold
from models import small_cnn  # noqa: F401  (registers the demo's architecture)

__all__ = ["ARCHITECTURES", "Backbone", "ModelConfig", "TrainingRecipe", "TransformConfig", "apply_react",
           "build_backbone", "file_sha256", "react_threshold", "resolve_checkpoint"]
