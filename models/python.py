"""A network given as a Python object (the library call's `model=`): any nn.Module, cut at its head or by a
callable that returns (features, logits), keyed in the cache by what its features depend on."""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor, nn

from errors import UserError
from models.base import Backbone, find_head
from models.transforms import TransformConfig

log = logging.getLogger(__name__)

ImageTransform = Callable[[Image.Image], Tensor]  # PIL RGB image -> (3, H, W) normalised tensor
FeaturesAndLogits = Callable[[Tensor], tuple[Tensor, Tensor]]  # (N, 3, H, W) -> (N, D) features, (N, C) logits


@dataclass(frozen=True, eq=False)
class PythonModel:
    """Your own network. Its features are the input of its `head` (found, when not named, as the nn.Linear that
    computes its output), or the first of what `features_and_logits` returns. The module is used as given: put
    in eval mode and moved to the run's device, never edited."""

    name: str                                   # its name in tables, output folders and the cache
    module: nn.Module
    transform: TransformConfig | ImageTransform  # what each image goes through; a TransformConfig or e.g. a
    #                                             torchvision transform, whose repr keys the cache
    head: str | tuple[str, ...] = ()            # submodules from the feature to the logits; () = found
    features_and_logits: FeaturesAndLogits | None = None  # instead of a head, e.g. an OpenOOD network's
    #                                                        lambda x: net(x, return_feature=True)[::-1]
    react_percentile: float | None = None       # ReAct clip quantile of the bank features; needs a head

    def __post_init__(self) -> None:
        object.__setattr__(self, "head", (self.head,) if isinstance(self.head, str) else tuple(self.head))
        if not isinstance(self.module, nn.Module):
            raise UserError(f"model '{self.name}': module must be a torch.nn.Module, got {type(self.module).__name__}")
        if self.head and self.features_and_logits is not None:
            raise UserError(f"model '{self.name}': give a head or features_and_logits, not both")
        if self.react_percentile is not None and self.features_and_logits is not None:
            raise UserError(f"model '{self.name}': ReAct recomputes the logits from clipped features, which needs "
                            f"the head; name it instead of giving features_and_logits")
        if self.react_percentile is not None and not 0 < self.react_percentile < 1:
            raise UserError(f"model '{self.name}': react_percentile must be in (0, 1) or None, "
                            f"got {self.react_percentile}")
        if not isinstance(self.transform, TransformConfig) and re.search(r" at 0x[0-9a-f]+", repr(self.transform)):
            raise UserError(f"model '{self.name}': the transform's repr {self.transform!r} names a memory address, "
                            f"so the feature cache cannot key on it; pass a TransformConfig or a torchvision "
                            f"transform")

    def image_transform(self) -> ImageTransform:
        return self.transform.build() if isinstance(self.transform, TransformConfig) else self.transform

    def backbone(self) -> Backbone:
        """The module cut at its feature, in eval mode; its widths checked by forwarding one blank image."""
        module = self.module.eval()
        device = next(module.parameters()).device
        probe = self.image_transform()(Image.new("RGB", (256, 256)))
        if not isinstance(probe, Tensor) or probe.ndim != 3:
            raise UserError(f"model '{self.name}': the transform must turn a PIL image into a (3, H, W) tensor, got "
                            f"{tuple(probe.shape) if isinstance(probe, Tensor) else type(probe).__name__}")
        if self.features_and_logits is None:
            head, feature_dim = find_head(module, tuple(probe.shape[1:]), self.head)
            return Backbone(module, head, feature_dim).eval()
        with torch.inference_mode():
            outputs = self.features_and_logits(probe[None].to(device))
        shapes = [tuple(part.shape) if isinstance(part, Tensor) else type(part).__name__
                  for part in (outputs if isinstance(outputs, tuple) else (outputs,))]
        if len(shapes) != 2 or not all(isinstance(shape, tuple) and len(shape) == 2 and shape[0] == 1
                                       for shape in shapes):
            raise UserError(f"model '{self.name}': features_and_logits must return (features (N, D), logits "
                            f"(N, C)) for N images; for one image it returned {shapes}")
        return FeatureLogitsBackbone(module, self.features_and_logits, shapes[0][1], shapes[1][1]).eval()

    def cache_key(self) -> dict:
        """What the features depend on: the weights' content, the code of the module's classes (and of
        `features_and_logits`), the head and the transform. Blind to code the forward reaches outside those
        classes (a helper function, a global), which a rename of `name` or a new cache dir covers."""
        cut = list(self.head) if self.features_and_logits is None else _qualified_name(self.features_and_logits)
        transform = (dataclasses.asdict(self.transform) if isinstance(self.transform, TransformConfig)
                     else repr(self.transform))
        return {"model": self.name, "architecture": f"python:{_qualified_name(type(self.module))}",
                "code_sha256": code_sha256(self.module, self.features_and_logits),
                "weights_sha256": weights_sha256(self.module), "cut": cut, "transform": transform}


class FeatureLogitsBackbone(Backbone):
    """A module cut by a callable images -> (features, logits): a cache row holds both, side by side."""

    def __init__(self, model: nn.Module, features_and_logits: FeaturesAndLogits, feature_dim: int,
                 num_classes: int) -> None:
        nn.Module.__init__(self)
        self.model = model
        self.features_and_logits = features_and_logits
        self.feature_dim = feature_dim
        self.row_dim = feature_dim + num_classes

    def features(self, images: Tensor) -> Tensor:
        features, logits = self.features_and_logits(images)
        return torch.cat([features, logits.to(features.dtype)], dim=1)  # (N, D + C)

    def outputs(self, rows: Tensor, clip: float | None = None) -> tuple[Tensor, Tensor]:
        if clip is not None:
            raise ValueError("ReAct needs the head to recompute the logits of clipped features")
        return rows[:, :self.feature_dim], rows[:, self.feature_dim:]


def weights_sha256(module: nn.Module) -> str:
    """sha256 of the module's state dict: every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def code_sha256(module: nn.Module, function: Callable | None = None) -> str:
    """sha256 of the source of every class the module is made of (with their base classes, torch's own
    excepted) and of `function`; a class without source (defined in an interactive session) enters by name."""
    classes = {cls for submodule in module.modules() for cls in type(submodule).__mro__
               if cls not in (object, nn.Module) and not cls.__module__.startswith("torch.")}
    parts = [(_qualified_name(cls), _source(cls)) for cls in classes]
    if function is not None:
        parts.append((_qualified_name(function), _source(function)))
    return hashlib.sha256(json.dumps(sorted(parts)).encode()).hexdigest()


def _source(code: object) -> str:
    try:
        return inspect.getsource(code)
    except (OSError, TypeError):
        log.warning("no source code of %s: the feature cache keys on its name only, so an edit of it that keeps "
                    "the name needs a new model name or --recompute", _qualified_name(code))
        return ""


def _qualified_name(code: object) -> str:
    return f"{getattr(code, '__module__', '?')}.{getattr(code, '__qualname__', type(code).__qualname__)}"
