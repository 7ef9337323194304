"""Backbone registry: architectures (registered, torchvision/<name>, timm/<name>), safe checkpoint loading, ReAct,
and networks given as Python objects; a Backbone gives features and logits."""
from models.base import (ARCHITECTURES, Backbone, ModelConfig, TrainingRecipe, build_backbone, find_head,
                         resolve_checkpoint)
from models.checkpoints import file_sha256
from models.python import PythonModel
from models.react import apply_react, react_threshold
from models.transforms import TransformConfig
from models import small_cnn  # noqa: F401  (registers the demo's architecture)

__all__ = ["ARCHITECTURES", "Backbone", "ModelConfig", "PythonModel", "TrainingRecipe", "TransformConfig",
           "apply_react", "build_backbone", "file_sha256", "find_head", "react_threshold", "resolve_checkpoint"]
