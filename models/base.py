"""Backbones as a trunk (images -> raw penultimate features) plus a small classifier head, and safe weight loading.

The pipeline caches the trunk's features once per image; logits are later derived from the cache with
`Backbone.classifier` (a linear layer, or a LayerNorm and a linear layer for the paper's ViT), so every
architecture is only a torchvision model and the names of its head's parts.
"""
from __future__ import annotations

import argparse
import hashlib
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torchvision import transforms

from errors import UserError
from models.openood_resnet18 import ResNet18_32x32
from registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = {"bilinear": transforms.InterpolationMode.BILINEAR,
                  "bicubic": transforms.InterpolationMode.BICUBIC}


@dataclass(frozen=True)
class TransformConfig:
    """The evaluation preprocessing a backbone was trained with."""
    resize: int = 256                  # shorter side after resizing, in pixels
    crop: int = 224                    # side of the square center crop; also the model's input size
    interpolation: str = "bilinear"    # resize filter: bilinear | bicubic
    mean: tuple[float, float, float] = IMAGENET_MEAN  # per-channel mean subtracted after ToTensor
    std: tuple[float, float, float] = IMAGENET_STD    # per-channel std divided by after ToTensor

    def __post_init__(self) -> None:
        for key in ("resize", "crop"):
            if getattr(self, key) < 1:
                raise UserError(f"transform: {key} must be at least 1 pixel, got {getattr(self, key)}")
        if any(value <= 0 for value in self.std):
            raise UserError(f"transform: every std must be positive (it divides the pixels), got {list(self.std)}")
        if self.interpolation not in INTERPOLATIONS:
            raise UserError(f"unknown interpolation '{self.interpolation}'; valid: {', '.join(INTERPOLATIONS)}")
        # YAML gives lists; tuples keep the config hashable and its repr stable for cache keys
        object.__setattr__(self, "mean", tuple(self.mean))
        object.__setattr__(self, "std", tuple(self.std))

    def build(self) -> transforms.Compose:
        """PIL image -> normalised (3, crop, crop) tensor."""
        return transforms.Compose([
            transforms.Resize(self.resize, interpolation=INTERPOLATIONS[self.interpolation]),
            transforms.CenterCrop(self.crop),
            transforms.ToTensor(),
            transforms.Normalize(self.mean, self.std),
        ])


@dataclass(frozen=True)
class TrainingRecipe:
    """How to train the model at start-up when it ships no checkpoint (the offline demo's small CNN)."""
    dataset: str                       # configs/datasets/<dataset>.yaml; its "train" split is used
    epochs: int = 20                   # passes over the train split
    batch_size: int = 64               # images per step
    learning_rate: float = 1e-3        # Adam's step size
    seed: int = 0                      # initialisation and shuffling


@dataclass(frozen=True)
class ModelConfig:
    """One configs/models/<name>.yaml: which architecture, which weights, how to preprocess."""
    name: str                          # CLI name, the YAML file's stem
    architecture: str                  # a name registered in ARCHITECTURES
    checkpoint: str = ""               # file name looked up in the pretrained dir and the torch hub cache, or a path
    checkpoint_format: str = "torchvision"  # layout of the file: supcon | torchvision
    checkpoint_url: str = ""           # where users download the checkpoint; shown when it is missing
    num_classes: int = 1000            # outputs of the classifier
    react_percentile: float | None = None  # ReAct clip quantile of the bank features in (0, 1); None = no clipping
    transform: TransformConfig = field(default_factory=TransformConfig)  # evaluation preprocessing
    train: TrainingRecipe | None = None  # no checkpoint: train at start-up with this recipe, cache the weights

    def __post_init__(self) -> None:
        ARCHITECTURES.get(self.architecture)
        CHECKPOINT_FORMATS.get(self.checkpoint_format)
        if self.num_classes < 1:
            raise UserError(f"model '{self.name}': num_classes must be positive, got {self.num_classes}")
        if not self.checkpoint and self.train is None:
            raise UserError(f"model '{self.name}': set 'checkpoint' (a weights file) or 'train' (a recipe)")
        if self.react_percentile is not None and not 0 < self.react_percentile < 1:
            raise UserError(f"model '{self.name}': react_percentile must be in (0, 1) or null, "
                            f"got {self.react_percentile}")


# An architecture builder: (num_classes, image_size) -> (torchvision model, its classifier head).
# The head names the submodules that map the penultimate features to logits, in the order they run: one name
# ("fc"), or several when the paper's feature is taken earlier than the torchvision head's input (the ViT's
# final LayerNorm). A new feature definition needs a new architecture name: the feature cache keys on it.
ArchitectureBuilder = Callable[[int, int], tuple[nn.Module, str | tuple[str, ...]]]
ARCHITECTURES: Registry[ArchitectureBuilder] = Registry("architecture")


@ARCHITECTURES.register("resnet50")
def _resnet50(num_classes: int, image_size: int) -> tuple[nn.Module, str]:
    return torchvision.models.resnet50(num_classes=num_classes), "fc"


@ARCHITECTURES.register("regnet_y_16gf")
def _regnet_y_16gf(num_classes: int, image_size: int) -> tuple[nn.Module, str]:
    return torchvision.models.regnet_y_16gf(num_classes=num_classes), "fc"


@ARCHITECTURES.register("vit_b_16")
def _vit_b_16(num_classes: int, image_size: int) -> tuple[nn.Module, str]:
    """Feature: the class token after the encoder's final LayerNorm (torchvision's head input; OpenOOD's)."""
    return torchvision.models.vit_b_16(num_classes=num_classes, image_size=image_size), "heads"


@ARCHITECTURES.register("vit_b_16_pre_ln")
def _vit_b_16_pre_ln(num_classes: int, image_size: int) -> tuple[nn.Module, tuple[str, str]]:
    """Feature: the class token before the final LayerNorm; logits = head(LayerNorm(feature)) (the paper's code).

    Moving the LayerNorm after the class-token selection changes nothing: it normalises each token alone."""
    return (torchvision.models.vit_b_16(num_classes=num_classes, image_size=image_size),
            ("encoder.ln", "heads"))


@ARCHITECTURES.register("mobilenet_v2")
def _mobilenet_v2(num_classes: int, image_size: int) -> tuple[nn.Module, str]:
    # the head is Dropout -> Linear; the dropout is a no-op in eval mode
    return torchvision.models.mobilenet_v2(num_classes=num_classes), "classifier"


@ARCHITECTURES.register("resnet18_32x32")
def _resnet18_32x32(num_classes: int, image_size: int) -> tuple[nn.Module, str]:
    """OpenOOD v1.5's CIFAR ResNet-18 in its own parameter names; feature: the pooled 512-d input of fc."""
    return ResNet18_32x32(num_classes), "fc"


class Backbone(nn.Module):
    """A torchvision classifier split at its head: `features` gives raw penultimate features, `classifier` logits."""

    def __init__(self, model: nn.Module, head: str | tuple[str, ...]) -> None:
        """Takes over `model`: the `head` submodules become nn.Identity in it and, in order, the `classifier`."""
        super().__init__()
        names = (head,) if isinstance(head, str) else tuple(head)
        parts = [model.get_submodule(name) for name in names]
        self.classifier: nn.Module = parts[0] if len(parts) == 1 else nn.Sequential(*parts)
        linears = [module for module in self.classifier.modules() if isinstance(module, nn.Linear)]
        if len(linears) != 1:
            raise ValueError(f"head {names} must hold exactly one nn.Linear, found {len(linears)}")
        for name in names:
            model.set_submodule(name, nn.Identity())
        self.trunk = model
        self.feature_dim: int = linears[0].in_features

    def features(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) normalised images -> (N, D) raw penultimate features (before any ReAct clipping)."""
        return self.trunk(images)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(N, 3, H, W) -> features (N, D) and logits (N, num_classes)."""
        features = self.features(images)
        return features, self.classifier(features)


# A checkpoint format: (loaded file, its path) -> state dict in the torchvision model's own parameter names.
StateDictReader = Callable[[object, Path], dict[str, Tensor]]
CHECKPOINT_FORMATS: Registry[StateDictReader] = Registry("checkpoint format")


def resolve_checkpoint(config: ModelConfig, pretrained_dir: Path) -> Path:
    """The checkpoint file: the path as given, else in `pretrained_dir`, else in the torch hub cache."""
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    candidates = [Path(config.checkpoint).expanduser(), Path(pretrained_dir) / config.checkpoint,
                  hub_dir / config.checkpoint]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    source = (f"download it from {config.checkpoint_url} and put it in {pretrained_dir} as {config.checkpoint}"
              if config.checkpoint_url else f"{Path(pretrained_dir) / 'README.md'} and the model's YAML say where to "
                                            f"get it")
    raise UserError(f"checkpoint '{config.checkpoint}' of model '{config.name}' not found in {pretrained_dir} "
                    f"nor in the torch hub cache {hub_dir}; {source}")


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks; the feature cache keys on the weights' checksum."""
    with Path(path).open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def build_backbone(config: ModelConfig, pretrained_dir: Path) -> Backbone:
    """The configured architecture with its checkpoint loaded strictly, in eval mode."""
    path = resolve_checkpoint(config, pretrained_dir)
    state_dict = CHECKPOINT_FORMATS.get(config.checkpoint_format)(_read_checkpoint(path), path)
    model, head = _build_uninitialised(ARCHITECTURES.get(config.architecture), config)
    _check_state_dict(model, state_dict, f"checkpoint {path} does not fit architecture '{config.architecture}'")
    expected = model.state_dict()
    # assign=True keeps the checkpoint's tensors, so cast them as a copying load would (a float16 file -> float32)
    model.load_state_dict({key: tensor.to(expected[key].dtype) if key in expected else tensor
                           for key, tensor in state_dict.items()}, strict=True, assign=True)
    unloaded = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if unloaded:
        raise RuntimeError(f"architecture '{config.architecture}' has tensors no checkpoint fills: {unloaded[:3]}")
    return Backbone(model, head).eval()


def _build_uninitialised(builder: ArchitectureBuilder, config: ModelConfig) -> tuple[nn.Module, str | tuple[str, ...]]:
    """The architecture on the meta device, with no random initialisation to overwrite; on the CPU for builders
    that compute with tensors while building (torchvision's RegNet widths)."""
    try:
        with torch.device("meta"):
            return builder(config.num_classes, config.transform.crop)
    except NotImplementedError:
        return builder(config.num_classes, config.transform.crop)


def _read_checkpoint(path: Path) -> object:
    """torch.load that unpickles only tensors, plain containers and argparse.Namespace (SupCon saves its `opt`)."""
    with path.open("rb") as file:
        start = file.read(2)
    # torch.save writes a zip archive, or (legacy) a pickle that starts with the PROTO opcode
    if start != b"PK" and start[:1] != pickle.PROTO:
        raise UserError(f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle); "
                        f"re-download it")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UserError(f"refused to load {path}: {_unpickling_reason(error)} (a checkpoint may hold only "
                        f"tensors, plain containers and argparse.Namespace)") from None
    except (RuntimeError, EOFError) as error:
        reason = str(error).split(". ")[0] or "unexpected end of file"
        raise UserError(f"{path} is truncated or corrupt ({reason}); re-download it") from None


def _unpickling_reason(error: pickle.UnpicklingError) -> str:
    """The useful part of torch's long weights-only error: the refused global, else its last detail line."""
    message = str(error)
    refused = re.search(r"GLOBAL ([\w.]+)", message)
    if refused:
        return f"it holds {refused.group(1)}, which is not allowed"
    details = [line.strip() for line in message.split("Check the documentation")[0].splitlines() if line.strip()]
    return details[-1] if details else "unreadable pickle"


@CHECKPOINT_FORMATS.register("torchvision")
def _torchvision_state_dict(checkpoint: object, path: Path) -> dict[str, Tensor]:
    """A plain state dict of the whole torchvision model."""
    return _strip_data_parallel(_tensor_dict(checkpoint, path, "a torchvision state dict"))


@CHECKPOINT_FORMATS.register("supcon")
def _supcon_state_dict(checkpoint: object, path: Path) -> dict[str, Tensor]:
    """SupCon training output: model_state_dict = encoder.* (torchvision resnet without fc) + fc.* + head.*."""
    if not isinstance(checkpoint, Mapping) or "model_state_dict" not in checkpoint:
        keys = list(checkpoint)[:5] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise UserError(f"{path} is not a SupCon checkpoint: no 'model_state_dict' (found {keys}); "
                        f"is checkpoint_format right?")
    model_state_dict = _tensor_dict(checkpoint["model_state_dict"], path, "a SupCon model_state_dict")
    state_dict = {}
    for key, tensor in _strip_data_parallel(model_state_dict).items():
        part, _, name = key.partition(".")
        if part == "encoder":
            state_dict[name] = tensor
        elif part != "head":  # the contrastive projection head plays no part in classification
            state_dict[key] = tensor
    return state_dict


def _tensor_dict(checkpoint: object, path: Path, expected: str) -> dict[str, Tensor]:
    if not isinstance(checkpoint, Mapping):
        raise UserError(f"{path} holds a {type(checkpoint).__name__}, not {expected}")
    others = [key for key, value in checkpoint.items() if not isinstance(value, Tensor)]
    if others:
        raise UserError(f"{path} is not {expected}: {_first_few(others)} are not tensors; "
                        f"is checkpoint_format right?")
    return dict(checkpoint)


def _strip_data_parallel(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drops the 'module' name parts that nn.DataParallel adds (at the start or after 'encoder.')."""
    return {".".join(part for part in key.split(".") if part != "module"): tensor
            for key, tensor in state_dict.items()}


def _check_state_dict(model: nn.Module, state_dict: dict[str, Tensor], problem: str) -> None:
    """UserError listing missing, unexpected and mis-shaped tensors, so a load never leaves layers random."""
    expected = model.state_dict()
    # BatchNorm fills in num_batches_tracked itself for checkpoints saved before the buffer existed
    missing = [key for key in expected if key not in state_dict and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in state_dict if key not in expected]
    misshaped = [f"{key} {tuple(tensor.shape)} != {tuple(expected[key].shape)}"
                 for key, tensor in state_dict.items() if key in expected and tensor.shape != expected[key].shape]
    details = [f"{len(keys)} {kind}: {_first_few(keys)}"
               for kind, keys in [("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)]
               if keys]
    if details:
        raise UserError(f"{problem}; {'; '.join(details)}")


def _first_few(items: list[str], count: int = 3) -> str:
    return ", ".join(items[:count]) + (", ..." if len(items) > count else "")
