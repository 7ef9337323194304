"""Architectures named after their library: `torchvision/<builder>` and `timm/<model>[.<tag>]`.

They are built without weights (the user's checkpoint fills them); the feature is the input of the nn.Linear
whose output is the model's (found by `models.base.find_head`), and the preprocessing, when the YAML gives
none, is read from the library's metadata: the torchvision weights' own `transforms()`, or timm's pretrained
config of the model. Nothing is downloaded.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from types import ModuleType

import torchvision
from torch import nn

from errors import UserError, did_you_mean
from models.transforms import INTERPOLATIONS, TransformConfig

TORCHVISION, TIMM = "torchvision/", "timm/"
# (num_classes, image_size) -> (model, head submodules or () to find them)
ArchitectureBuilder = Callable[[int, int], tuple[nn.Module, tuple[str, ...]]]
# torchvision builders whose input size is a constructor argument, by name prefix
SIZED_BUILDERS = {"vit_": lambda size: {"image_size": size}, "maxvit_": lambda size: {"input_size": (size, size)}}


def is_library_architecture(name: str) -> bool:
    return name.startswith((TORCHVISION, TIMM))


def library_builder(name: str) -> ArchitectureBuilder:
    """The builder of a `torchvision/` or `timm/` architecture; a UserError for a name the library lacks."""
    if name.startswith(TORCHVISION):
        builder = name.removeprefix(TORCHVISION)
        known = torchvision.models.list_models(module=torchvision.models)  # the classification builders
        if builder not in known:
            raise UserError(f"torchvision has no classification model '{builder}'{did_you_mean(builder, known)}; "
                            f"valid: {', '.join(known)}")
        sized = next((arguments for prefix, arguments in SIZED_BUILDERS.items() if builder.startswith(prefix)),
                     lambda size: {})
        return lambda num_classes, size: (torchvision.models.get_model(builder, num_classes=num_classes,
                                                                       **sized(size)), ())
    timm = _timm()
    model = name.removeprefix(TIMM)
    base, _, tag = model.partition(".")
    if not timm.is_model(base) or (tag and model not in timm.list_pretrained(f"{base}.*")):
        known = timm.list_pretrained(f"{base}.*") if timm.is_model(base) else timm.list_models()
        raise UserError(f"timm has no model '{model}'{did_you_mean(model, known)}")
    return lambda num_classes, size: (timm.create_model(model, pretrained=False, num_classes=num_classes), ())


def torchvision_weights(architecture: str, weights: str) -> torchvision.models.WeightsEnum:
    """The torchvision weights `weights` ("IMAGENET1K_V1", or "ResNet50_Weights.IMAGENET1K_V1") of a
    `torchvision/` architecture."""
    if not architecture.startswith(TORCHVISION):
        raise UserError(f"'weights: {weights}' names torchvision weights, but architecture '{architecture}' is not "
                        f"a torchvision/ one; give 'transform' and 'checkpoint' instead")
    enum = torchvision.models.get_model_weights(architecture.removeprefix(TORCHVISION))
    member = weights.rpartition(".")[2]
    if member not in enum.__members__ or weights.partition(".")[0] not in (member, enum.__name__):
        names = [f"{enum.__name__}.{name}" for name in enum.__members__]
        raise UserError(f"{architecture} has no weights '{weights}'{did_you_mean(weights, names)}; "
                        f"valid: {', '.join(names)}")
    return enum[member]


def weights_transform(weights: torchvision.models.WeightsEnum) -> TransformConfig:
    """The preprocessing of torchvision `weights.transforms()`, read from its parameters."""
    preset = weights.transforms()
    interpolation = preset.interpolation.value
    if len(preset.resize_size) != 1 or interpolation not in INTERPOLATIONS or not preset.antialias:
        raise UserError(f"{weights}'s preprocessing ({preset}) is not a shorter-side resize with an antialiased "
                        f"{' or '.join(INTERPOLATIONS)} filter; give 'transform' in the YAML")
    return TransformConfig(resize=preset.resize_size[0], crop=preset.crop_size[0], interpolation=interpolation,
                           mean=tuple(preset.mean), std=tuple(preset.std))


def timm_transform(architecture: str) -> TransformConfig:
    """The evaluation preprocessing of timm's pretrained config of the model (its tag's, when named)."""
    timm = _timm()
    config = timm.data.resolve_data_config(
        pretrained_cfg=timm.models.get_pretrained_cfg(architecture.removeprefix(TIMM)).to_dict())
    _, height, width = config["input_size"]
    if height != width or config["crop_mode"] != "center" or config["interpolation"] not in INTERPOLATIONS:
        raise UserError(f"timm's preprocessing of {architecture} ({config}) is not a square center crop with a "
                        f"{' or '.join(INTERPOLATIONS)} filter; give 'transform' in the YAML")
    return TransformConfig(resize=math.floor(height / config["crop_pct"]), crop=height,
                           interpolation=config["interpolation"], mean=tuple(config["mean"]), std=tuple(config["std"]))


def timm_version() -> str:
    """timm's version: part of a timm/ model's cache key, since a timm release can change a model's forward."""
    return _timm().__version__


def _timm() -> ModuleType:
    """timm, imported on first use: a second or so that runs without a timm model need not pay."""
    import timm
    import timm.data
    return timm
