"""Backbone registry: architectures, safe checkpoint loading, ReAct; a Backbone's forward gives (features, logits)."""
from models.base import (ARCHITECTURES, Backbone, ModelConfig, TransformConfig, build_backbone, file_sha256,
                         resolve_checkpoint)
from models.react import apply_react, react_threshold

__all__ = ["ARCHITECTURES", "Backbone", "ModelConfig", "TransformConfig", "apply_react", "build_backbone",
           "file_sha256", "react_threshold", "resolve_checkpoint"]
